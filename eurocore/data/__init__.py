"""Training data: the interface the trainer reads (``TokenSource``: a global batch as a pure
function of the step), the synthetic Markov source with a known loss floor, and tokenized
corpora in Megatron-LM's indexed format.

Knows nothing of the model or of parallelism: ranks ask for their rows of a global batch.
"""

from eurocore.data.source import Batch, TokenSource
from eurocore.data.synthetic import MarkovSource, SyntheticSource, uniform_loss

__all__ = ["Batch", "MarkovSource", "SyntheticSource", "TokenSource", "uniform_loss"]
