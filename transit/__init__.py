"""The transit-map task itself: metro graphs, questions and routes (metro.py), the released datasets' rows (rows.py),
and the authors' official evaluators and released reward, reproduced (released.py)."""
