"""A Beam RunInference model handler for jaxdiff, for users' own pipelines.

    from apache_beam.ml.inference.base import RunInference
    samples | RunInference(JaxDiffusionModelHandler(RendererFactory(RenderConfig(...))))

Elements are `Sample`s, results are `Rendered`s (an image, or `error` saying why not).
Beam batches elements up to the handler's `batch_size`; the renderer splits a batch into
its own, padding the last, so each shape compiles once.
`jaxdiff render` does not use this: it renders whole shards, to keep shards resumable.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from jaxdiff.engine.sample import Rendered, Sample


class JaxDiffusionModelHandler(ModelHandler[Sample, Rendered, Any]):
    """Loads a renderer with `renderer_factory` and renders batches of Samples with it."""

    def __init__(self, renderer_factory: Callable[[], Any], *, batch_size: int = 8,
                 share_across_processes: bool = False, max_batch_duration_secs: int | None = None):
        """`share_across_processes`: one model in one process of the worker, served to the others
        (for a single accelerator owned by one process, e.g. a TPU host); default one per process."""
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._factory = renderer_factory
        self._batch_size = batch_size
        self._share = share_across_processes
        self._max_batch_duration_secs = max_batch_duration_secs

    def load_model(self):
        return self._factory()

    def run_inference(self, batch: Sequence[Sample], model, inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[Rendered]:
        if inference_args:
            raise ValueError(f"inference_args are not used by jaxdiff (got {sorted(inference_args)}); "
                             "put per-sample settings in the Sample fields")
        # The renderer batches to its own size; shared across processes, `model` is a
        # proxy that serves method calls only.
        return model.render_samples(list(batch))

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs = {"min_batch_size": 1, "max_batch_size": self._batch_size}
        if self._max_batch_duration_secs is not None:
            kwargs["max_batch_duration_secs"] = self._max_batch_duration_secs
        return kwargs

    def share_model_across_processes(self) -> bool:
        return self._share

    def get_num_bytes(self, batch: Sequence[Sample]) -> int:
        return sum(len(s.prompt.encode()) + _image_bytes(s.init_image) + _image_bytes(s.mask) for s in batch)

    def get_metrics_namespace(self) -> str:
        return "jaxdiff"


def _image_bytes(image) -> int:
    """An input image's size in memory: a numpy array's bytes, a PIL image's pixels x bands."""
    if isinstance(image, np.ndarray):
        return image.nbytes
    if hasattr(image, "getbands"):  # PIL
        return image.width * image.height * len(image.getbands())
    return 0
