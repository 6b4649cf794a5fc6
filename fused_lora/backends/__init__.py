"""What a route runs: the passes of the PyTorch path (``lora_torch``, ``dora_torch``) and of the Triton launchers
(``lora_triton``, ``dora_triton``, ``bnb4_triton``, ``dropout_triton``; the launch toolbox ``triton_launch`` and its
fast path ``fast_launch``), the dropout mask of a call (``masks``), and what is decided at run time per key: the path
table (``path_state``), auto's timing (``path_choice``) and the self-check (``self_check``)."""
