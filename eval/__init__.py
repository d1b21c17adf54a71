"""ft eval: filled by later work (see README)."""
