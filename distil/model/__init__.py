"""The teacher (loaded, checked against the config) and the student made from it, behind one forward interface."""
