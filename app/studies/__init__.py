"""Studies: methods and seeds compared on one task, on identical splits, with statistics."""
