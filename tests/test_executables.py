"""The task executables, run as Fractal runs them (--args-json / --out-json)."""

import json

import numpy as np
from ngio import open_ome_zarr_container, open_ome_zarr_well

from fractal_tasks.tools.demo import run_task, run_workflow


def test_workflow_through_the_executables(make_plate, tmp_path):
    plate = make_plate(n_acquisitions=2)
    urls = [i.zarr_url for i in plate.images]
    updates = run_workflow(urls, plate.plate_url, tmp_path / "logs", level_path="0")
    assert updates == [{"zarr_url": f"{u}_registered", "origin": u} for u in urls]
    table = open_ome_zarr_container(urls[1]).get_roi_table("FOV_ROI_table")
    for roi in table.rois():
        found = np.array([roi.model_extra[f"translation_{a}"] for a in "yx"])
        true = np.array(plate.true_translation_um(urls[1], roi.name)[1:])
        np.testing.assert_allclose(found, true, atol=0.5 * plate.pixel_size)
    # the applies run in parallel: the well lists them in completion order
    paths = open_ome_zarr_well(plate.plate_url + "/B/03").paths()
    assert sorted(paths) == ["0", "0_registered", "1", "1_registered"]
    # each process ends at once after a success: its log is whole all the same
    logs = sorted((tmp_path / "logs").glob("*.log"))
    tasks = {log.name.rsplit("-", 1)[0] for log in logs}
    assert tasks == {
        "init_calculate_registration",
        "calculate_registration",
        "init_find_consensus",
        "find_consensus",
        "apply_registration_to_image",
    }
    for log in logs:
        task = log.name.rsplit("-", 1)[0]
        text = log.read_text()
        assert f"START {task} task" in text and f"END {task} task" in text, log


def test_failing_executable_reports_the_clear_error(make_plate, tmp_path):
    plate = make_plate(n_acquisitions=2)
    urls = [i.zarr_url for i in plate.images]
    args = {
        "zarr_url": urls[1],
        "init_args": {"reference_zarr_url": urls[0]},
        "wavelength_id": "NOPE",
    }
    try:
        run_task("calculate_registration.py", args, tmp_path)
    except RuntimeError as error:
        assert "No channel with wavelength id or label 'NOPE'" in str(error)
    else:
        raise AssertionError("the task should have failed")
    assert json.loads(next(tmp_path.glob("*.args.json")).read_text()) == args
