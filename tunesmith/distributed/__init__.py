"""Back-ends that start the training processes for tunesmith itself
(``training.distributed.backend``): :mod:`.torchrun` (processes on this machine)
and :mod:`.ray_train` (Ray Train workers on a local or remote Ray cluster). Both run
the same :class:`~tunesmith.core.session.TrainingSession` in every process through
:mod:`.worker`; :mod:`tunesmith.core.launch` dispatches to them."""
