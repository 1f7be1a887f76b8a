"""booklib: the book's own code, beside its chapters (not part of the installed circuitlib package).

report     chapter helpers: provenance boxes, tables, the paper's quoted numbers, computed findings
attention  CircuitsVis attention views that work offline and are deterministic
exercises  the exercises' checkers and reference solutions
"""
