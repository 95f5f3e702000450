"""Loading at start, in the order it happens: which checkpoint (plan.py), its file list (catalogue.py), the files
each rank reads (rank_files.py), the node-local download (download.py), the check against the step marker
(verify.py), loading at another data or pipeline size (reshard.py); loader.py runs them."""
