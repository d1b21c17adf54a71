"""Generate datasets/support/: support tickets → JSON triage, with a held-out set that tests
generalization rather than recall.

    python datasets/make_support.py            # rewrites train.jsonl and heldout.jsonl

Each example is a chat: the user message is a ticket, the assistant answers with one line of
JSON: {"category": ..., "priority": ..., "summary": ...}. Categories: billing, technical,
feature-request, bug-report. Priorities: low, medium, high, urgent.

Held-out tickets use products and phrasings that never occur in training (disjoint pools
below), so a model that only memorised training tickets does not score well on them.
The generator is seeded: the same script always writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261122
N_TRAIN = 800
N_HELDOUT = 120

# Disjoint pools: index 0 → training, index 1 → held-out.
PRODUCTS = (
    ["the mobile app", "the web dashboard", "Invoicely", "the desktop client", "TeamSync",
     "the analytics page", "the Android app", "CloudVault", "the admin console", "PayFlow"],
    ["the iPad app", "ShipTrack", "the reporting module", "the browser extension", "NoteNest"],
)
NAMES = (["Anna", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas"],
         ["Kai", "Lena", "Mateo", "Nora", "Omar"])
OPENERS = (["Hi,", "Hello team,", "Hey,", "Good morning,", "Hi there,", ""],
           ["Dear support,", "Greetings,", "Hello folks,"])
CLOSERS = (["Thanks.", "Thank you!", "Regards, {name}", "Cheers, {name}", "", "Please help."],
           ["Best wishes, {name}", "Many thanks in advance.", "Looking forward to your reply."])

AMOUNTS = ["$9.99", "$19", "$49.99", "$120", "$240", "€35", "£15", "$1,200"]
ERRORS = ["error 500", "error 403", "a timeout", "'invalid session'", "code 0x80070005", "a blank page"]
FEATURES = ["dark mode", "an export to CSV", "two-factor login", "recurring reminders",
            "a public API", "bulk editing", "keyboard shortcuts", "an offline mode", "SSO with Okta"]

# (category, [phrasings for training], [phrasings for held-out], summary, priority cues)
# Priority: urgent / high / medium / low, decided by the impact stated in the ticket.
ISSUES = [
    ("billing",
     ["I was charged {amount} twice for my {product} subscription this month.",
      "My card was billed {amount} two times for the same order in {product}."],
     ["There are two identical {amount} charges on my statement from {product}."],
     "Customer was charged twice ({amount}) for {product}."),
    ("billing",
     ["I cancelled {product} last month but you still charged me {amount}.",
      "Why did my {product} plan renew for {amount}? I had cancelled it."],
     ["My {product} subscription was renewed for {amount} even though I cancelled it."],
     "Charged {amount} for {product} after cancelling."),
    ("billing",
     ["Please send me a refund of {amount} for the unused part of my {product} plan.",
      "Can I get my {amount} back? I no longer use {product}."],
     ["I'd like {amount} refunded; {product} did not work for us."],
     "Customer requests a {amount} refund for {product}."),
    ("technical",
     ["I can't log in to {product}; it shows {error} after I enter my password.",
      "Since yesterday {product} rejects my login with {error}."],
     ["Signing in to {product} fails with {error} every time."],
     "User cannot log in to {product} ({error})."),
    ("technical",
     ["How do I connect {product} to our Slack workspace? The guide is unclear.",
      "I need help setting up {product} with our SSO provider."],
     ["What are the steps to link {product} with our company calendar?"],
     "User needs help configuring an integration in {product}."),
    ("technical",
     ["{product} is very slow today, pages take a minute to load.",
      "Everything in {product} loads slowly since this morning."],
     ["{product} has been sluggish all day; each click takes ages."],
     "{product} is slow to load."),
    ("feature-request",
     ["It would be great if {product} had {feature}.",
      "Could you add {feature} to {product}? Our team would use it daily."],
     ["Any plans to support {feature} in {product}? We would pay for it."],
     "Customer asks for {feature} in {product}."),
    ("feature-request",
     ["Please consider adding {feature}; {product} feels incomplete without it.",
      "Suggestion: {feature} for {product} would save us hours."],
     ["We'd love {feature} in {product} in a future release."],
     "Request to add {feature} to {product}."),
    ("bug-report",
     ["{product} crashes every time I upload a file larger than 20 MB.",
      "Uploading big files makes {product} crash instantly."],
     ["{product} closes itself whenever I attach a large file."],
     "{product} crashes on large file uploads."),
    ("bug-report",
     ["In {product}, the search returns nothing when the query has a hyphen.",
      "Search in {product} is broken for any term with a dash in it."],
     ["{product} search finds no results if I type a hyphenated word."],
     "{product} search fails for hyphenated queries."),
    ("bug-report",
     ["After the update, {product} shows {error} when saving a report.",
      "Saving in {product} fails with {error} since the last release."],
     ["Since the new version, {product} throws {error} whenever I press save."],
     "{product} fails to save reports ({error})."),
]

IMPACT = {  # sentence the ticket adds → priority; held-out uses its own sentences
    "urgent": (["This blocks our whole company right now.", "All our customers are affected!"],
               ["Production is down for every user."]),
    "high": (["I need this fixed today, it's blocking my work.", "This is costing us money."],
             ["Please treat this as a priority, we are losing sales."]),
    "medium": (["It's annoying but we have a workaround.", "Please look into it this week."],
               ["We can live with it for a few days."]),
    "low": (["No rush at all.", "Just a small thing, whenever you have time."],
            ["Not important, just letting you know."]),
}
FEATURE_PRIORITY = ["low", "medium"]  # wishes are never urgent


def make_ticket(rng: random.Random, pool: int) -> dict:
    category, phrasings_train, phrasings_heldout, summary = rng.choice(ISSUES)
    phrasing = rng.choice(phrasings_heldout if pool else phrasings_train)
    if category == "feature-request":
        priority = rng.choice(FEATURE_PRIORITY)
    else:
        priority = rng.choice(list(IMPACT))
    slots = dict(
        product=rng.choice(PRODUCTS[pool]), amount=rng.choice(AMOUNTS), error=rng.choice(ERRORS),
        feature=rng.choice(FEATURES), name=rng.choice(NAMES[pool]),
    )
    body = phrasing.format(**slots)
    body = body[0].upper() + body[1:]
    parts = [rng.choice(OPENERS[pool]), body, rng.choice(IMPACT[priority][pool]),
             rng.choice(CLOSERS[pool]).format(**slots)]
    ticket = " ".join(p for p in parts if p)
    text = summary.format(**slots)
    answer = {"category": category, "priority": priority, "summary": text[0].upper() + text[1:]}
    return {"messages": [{"role": "user", "content": ticket},
                         {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)}]}


def generate(n: int, pool: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make_ticket(rng, pool)
        key = row["messages"][0]["content"]
        if key not in seen:  # exact duplicates would inflate the set without adding signal
            seen.add(key)
            rows.append(row)
    return rows


def main() -> None:
    out = Path(__file__).parent / "support"
    out.mkdir(exist_ok=True)
    for name, n, pool in (("train", N_TRAIN, 0), ("heldout", N_HELDOUT, 1)):
        rows = generate(n, pool, SEED + pool)
        tmp = out / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out / f"{name}.jsonl")
        print(f"wrote {len(rows)} examples to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
