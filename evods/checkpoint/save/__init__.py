"""Saving during training: when (policy.py), how the files reach the storage (upload.py), and the save itself with
its step marker (saver.py)."""
