"""Restores a LoRA checkpoint in a process that never held the trained model.

`models_test.py` runs `python fresh_process.py <linen|nnx> <workdir>`: this
process knows only the model classes, the checkpoint directories and the input, restores
onto an 8-device mesh, and writes each restore mode's outputs to `<workdir>/out_<mode>.npy`.
Nothing happens on import (pytest imports it to collect doctests).
"""

import sys
from pathlib import Path


def main(kind: str, workdir: str) -> None:
    import jax

    jax.config.update('jax_num_cpu_devices', 8)

    import models_test as models
    import numpy as np

    restore = {'linen': models.restore_linen, 'nnx': models.restore_nnx}[kind]
    for mode, outputs in restore(Path(workdir), models.auto_mesh()).items():
        np.save(Path(workdir) / f'out_{mode}.npy', np.asarray(outputs))


if __name__ == '__main__':
    main(*sys.argv[1:])
