"""Running big: bf16 updates that do not vanish and 8-bit moments (precision.py), the memory plan (memory.py) over
the published model shapes (shapes.py), several GPUs with FSDP2 (distributed.py), LoRA and QLoRA (lora.py)."""
