"""`outrider demo`: the whole Outrider story on one machine."""
