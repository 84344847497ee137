"""The seam: the only code in safe-train that knows ``open_clip_train`` 3.3's internals.

- :mod:`.upstream`: every upstream name we use, and ``check_upstream()``, which names any that changed;
- :mod:`.patch`: running OpenCLIP's own ``main`` with the engine's data, loop and evaluation hooks;
- :mod:`.step`: the training step that mirrors 3.3's ``train_one_epoch`` loop body;
- :mod:`.rng`: the RNG streams, captured as plain data;
- :mod:`.fork`: the glue that ``patches/open_clip_train-3.3`` adds to a forked trainer.

Other modules import from here (``from safe_train import openclip as oc``). docs/openclip.md lists what
a port to OpenCLIP 4's task-based trainer changes.
"""

from safe_train.openclip.patch import CpuSafeDDP, dataset_kind, patched_openclip, run_openclip_main
from safe_train.openclip.rng import capture_rng_state, restore_rng_state
from safe_train.openclip.step import StepResult, TrainStep, report, to_device
from safe_train.openclip.upstream import (
    LATEST_CHECKPOINT_NAME,
    SAMPLE_SHUFFLE_INITIAL,
    SAMPLE_SHUFFLE_SIZE,
    SHARD_SHUFFLE_INITIAL,
    SHARD_SHUFFLE_SIZE,
    ResampledShards2,
    SharedEpoch,
    UpstreamChanged,
    check_upstream,
    detshuffle2,
    expand_urls,
    filter_no_caption_or_no_image,
    get_autocast,
    get_dataset_size,
    get_input_dtype,
    tarfile_to_samples_nothrow,
    unwrap_model,
    upstream_option_strings,
    upstream_parse_args,
    wds,
    wds_shuffle,
)

__all__ = [
    "CpuSafeDDP", "LATEST_CHECKPOINT_NAME", "SAMPLE_SHUFFLE_INITIAL", "SAMPLE_SHUFFLE_SIZE", "SHARD_SHUFFLE_INITIAL",
    "SHARD_SHUFFLE_SIZE", "ResampledShards2", "SharedEpoch", "StepResult", "TrainStep", "UpstreamChanged",
    "capture_rng_state", "check_upstream", "dataset_kind", "detshuffle2", "expand_urls",
    "filter_no_caption_or_no_image", "get_autocast", "get_dataset_size", "get_input_dtype", "patched_openclip",
    "report", "restore_rng_state", "run_openclip_main", "tarfile_to_samples_nothrow", "to_device", "unwrap_model",
    "upstream_option_strings", "upstream_parse_args", "wds", "wds_shuffle",
]
