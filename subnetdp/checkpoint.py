"""Checkpoints of an SDP model and its optimizer through ``torch.distributed.checkpoint``: each
rank saves only the chunks of the full model's tensors it holds, and a load under another worker
count, coverage or plan reads only the chunks each rank needs (``subnetdp.engine.checkpoint``).

    import subnetdp.checkpoint as sdpc
    sdpc.save("ckpt/step-400", sdp, optimizer)     # collective: every rank
    sdpc.load("ckpt/step-400", sdp, optimizer)     # any N, coverage or plan

or, in a trainer that checkpoints with its own ``dcp.save``/``dcp.load`` (torchtitan-style), the
names ``torch.distributed.checkpoint.state_dict`` uses: ``get_model_state_dict``,
``get_optimizer_state_dict``, ``set_model_state_dict``, ``set_optimizer_state_dict``, with
``planner=SavePlanner()`` / ``planner=LoadPlanner()``.
"""

from .engine.checkpoint import (
    ChunkedTensor,
    LoadPlanner,
    SavePlanner,
    get_model_state_dict,
    get_optimizer_state_dict,
    load,
    load_full_state_dict,
    save,
    set_model_state_dict,
    set_optimizer_state_dict,
)

__all__ = ["ChunkedTensor", "LoadPlanner", "SavePlanner", "get_model_state_dict", "get_optimizer_state_dict", "load",
           "load_full_state_dict", "save", "set_model_state_dict", "set_optimizer_state_dict"]
