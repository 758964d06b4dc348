"""The sequence-parallel core: layout and process groups (:mod:`.layout`), batch preparation and sharding
(:mod:`.sharding`), the per-batch step context (:mod:`.step_context`), Ulysses attention (:mod:`.ulysses`), ring
attention (:mod:`.ring`), the SP-correct loss (:mod:`.loss`), the accumulation-window token count
(:mod:`.accumulation`) and the MoE router loss over whole sequences (:mod:`.moe`). No Lightning in here."""
