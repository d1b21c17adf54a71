"""ft eval: the held-out comparison that proves (or disproves) that the fine-tune beats its base,
and `ft chat`, which lets a person try the same model.

heldout.py builds the items every column is asked; columns.py is base, fine-tuned and GGUF; metrics.py
and stats.py score them with paired bootstrap intervals; report.py writes eval/; runner.py ties them
together; chat.py is the terminal chat.

May import finetune (recipes, data, model loading) and export.llama (the GGUF runtime); nothing in
finetune or export imports eval.
"""
