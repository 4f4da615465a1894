"""Reading and writing files safely: depth-map pickles, text tables, snapshots, atomic writes."""
