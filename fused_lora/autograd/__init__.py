"""The autograd Functions: ``lora`` (dense base), ``qlora`` (bitsandbytes base), ``dora`` (DoRA), and what they
share (``common``). Each takes a route the router resolved (backend, GEMM) and calls that backend's passes."""
