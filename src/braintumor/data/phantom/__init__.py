"""The built-in synthetic source: anatomy, tumors, planted copies, and the folder they are written to."""
