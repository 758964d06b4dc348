"""Attention kernels and the hook into transformers' attention interface: block kernels that return and accept a
log-sum-exp (:mod:`.attention`), the tiled-backward and packed-row kernels (:mod:`.tiled`), attention within packed
segments batched by length (:mod:`.segments`, a vision tower's windows), the per-model dispatcher (:mod:`.dispatch`),
and the Liger-or-torch choice of the fused ops (:mod:`.impl`)."""
