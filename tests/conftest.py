from pathlib import Path

import pytest

from fractal_tasks.tools.synthetic import build_synthetic_plate

_TEMPLATES: dict = {}


def plate_copy(tmp_path: Path, **options):
    """A fresh copy of a synthetic plate (built once per option set per session)."""
    key = tuple(sorted(options.items()))
    if key not in _TEMPLATES:
        root = Path(_TEMPLATE_DIR) / f"t{len(_TEMPLATES)}"
        defaults = dict(
            wells=("B03",),
            n_acquisitions=3,
            fovs=(2, 2),
            fov_shape=(64, 80),
            levels=3,
            seed=1,
        )
        _TEMPLATES[key] = build_synthetic_plate(
            root / "plate.zarr", **{**defaults, **options}
        )
    return _TEMPLATES[key].copied_to(tmp_path / "plate.zarr")


@pytest.fixture(scope="session", autouse=True)
def _template_dir(tmp_path_factory):
    global _TEMPLATE_DIR
    _TEMPLATE_DIR = tmp_path_factory.mktemp("templates")
    yield


@pytest.fixture
def make_plate(tmp_path):
    def make(**options):
        return plate_copy(tmp_path, **options)

    return make
