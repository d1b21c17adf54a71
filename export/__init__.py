"""ft export: filled by later work (see README)."""
