"""What a route runs: the PyTorch path (``lora_torch``, ``dora_torch``) and the Triton launchers with their
orchestration (``lora_triton``, ``dora_triton``, ``bnb4_triton``, ``dropout_triton``), the launch toolbox
(``triton_launch``), the kernel-failure fallback (``kernel_fallback``) and the GEMM choice (``gemm_choice``)."""
