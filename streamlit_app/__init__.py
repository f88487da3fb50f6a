"""The chat page (`app.py`) and the small pieces it stands on; no SQL, no torch here."""
