"""Pattern families, one file each (see liger_fx/rewrite.py for what a family module exposes)."""
