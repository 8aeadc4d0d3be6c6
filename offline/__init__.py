"""Stand-ins built on this machine for what a real run downloads: the synthetic transit-map world, cities drawn as
metro maps (maps.py) and their questions (synthetic.py), and the tiny random-init Qwen2.5-VL (tiny_model.py)."""
