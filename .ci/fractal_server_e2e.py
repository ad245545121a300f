"""HTTP driver for the fractal-server end-to-end test (see fractal_server_e2e.sh).

Runs with the *server* venv's python: it needs fractal_server only for the
manifest check; everything else goes through the server's REST API with
urllib. Pixel checks and plate building run in the package's own python
(``--pkg-python``) through the helper scripts in ``.ci/e2e/``. With
``--backend slurm`` the workflow tasks get SLURM batching meta and the
SLURM-specific checks of ``.ci/slurm/checks.py`` run on the job folder.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

CALC = "Calculate Registration (image-based)"
CONSENSUS = "Find Registration Consensus"
APPLY = "Apply Registration to Image"
EXPECTED_TASKS = {
    CALC: ("compound", "init_calculate_registration.py", "calculate_registration.py"),
    CONSENSUS: ("compound", "init_find_consensus.py", "find_consensus.py"),
    APPLY: ("parallel", None, "apply_registration_to_image.py"),
}
BAD_WAVELENGTH = "NOPE"
BAD_WAVELENGTH_MESSAGE = "No channel with wavelength id or label"

# SLURM runs: per-task meta (merged by the server over the manifest's meta).
# The node has 2 CPUs: Calculate gets 2 CPUs per task, two tasks one after the
# other in each SLURM job; Apply gets 1 CPU per task, 3 tasks per job (one
# well of 3 cycles) of which 2 run at the same time.
SLURM_META = {
    CALC: {"cpus_per_task": 2, "mem": 2000, "tasks_per_job": 2, "parallel_tasks_per_job": 1},
    APPLY: {"cpus_per_task": 1, "mem": 1500, "tasks_per_job": 3, "parallel_tasks_per_job": 2},
}

FAILURES: list[str] = []


def say(msg: str) -> None:
    """Print a progress line."""
    print(f"[e2e-driver] {msg}", flush=True)


def check(cond: bool, what: str) -> bool:
    """Record a check; failures are collected and reported at the end."""
    if cond:
        say(f"ok   {what}")
    else:
        say(f"FAIL {what}")
        FAILURES.append(what)
    return cond


def fatal(msg: str) -> None:
    """Stop at once: later steps cannot run."""
    say(f"FATAL {msg}")
    sys.exit(1)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------
class ApiError(RuntimeError):
    """A non-2xx answer of the server."""

    def __init__(self, method: str, url: str, status: int, body: str):
        super().__init__(f"{method} {url} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class Client:
    """Minimal JSON client of the fractal-server REST API (stdlib only)."""

    def __init__(self, base_url: str):
        self.base = base_url.rstrip("/")
        self.token: str | None = None

    def _request(self, method, path, *, body=None, content_type=None, query=None):
        url = self.base + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if content_type:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise ApiError(method, path, e.code, body) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    def get(self, path, **query):
        """GET a JSON resource."""
        return self._request("GET", path, query=query or None)

    def post(self, path, payload=None, **query):
        """POST a JSON body (default ``{}``)."""
        body = json.dumps(payload if payload is not None else {}).encode()
        return self._request(
            "POST", path, body=body, content_type="application/json", query=query
        )

    def login(self, email: str, password: str) -> None:
        """Get a bearer token through the basic-auth login form."""
        form = urllib.parse.urlencode({"username": email, "password": password})
        out = self._request(
            "POST",
            "/auth/token/login/",
            body=form.encode(),
            content_type="application/x-www-form-urlencoded",
        )
        self.token = out["access_token"]

    def post_file(self, path, field, file_path: Path | None, fields=None):
        """POST multipart/form-data: plain form fields and one file (or none)."""
        boundary = "e2e" + uuid.uuid4().hex
        chunks = []
        for name, value in (fields or {}).items():
            chunks.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
                f"\r\n\r\n{value}\r\n".encode()
            )
        if file_path is not None:
            chunks.append(
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                    f'filename="{file_path.name}"\r\n'
                    "Content-Type: application/octet-stream\r\n\r\n"
                ).encode()
            )
            chunks.append(file_path.read_bytes())
            chunks.append(b"\r\n")
        chunks.append(f"--{boundary}--\r\n".encode())
        return self._request(
            "POST",
            path,
            body=b"".join(chunks),
            content_type=f"multipart/form-data; boundary={boundary}",
        )


# ---------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------
def _manifest_from_wheel(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/__FRACTAL_MANIFEST__.json")]
        if len(names) != 1:
            fatal(
                f"expected one __FRACTAL_MANIFEST__.json in {wheel.name}, got {names}"
            )
        return json.loads(zf.read(names[0]))


def cmd_validate_manifest(ns) -> None:
    """Validate the manifest with fractal-server's own ManifestV2 model."""
    import os

    # fractal_server.config builds its settings objects at import time; give
    # them placeholders (no database or server is used here).
    os.environ.setdefault("POSTGRES_DB", "unused")
    os.environ.setdefault("JWT_SECRET_KEY", "unused")
    from fractal_server.app.schemas.v2 import ManifestV2
    from pydantic import ValidationError

    repo_path = Path(ns.repo_manifest)
    if not repo_path.exists():
        fatal(f"{repo_path} does not exist")
    repo_manifest = json.loads(repo_path.read_text())
    wheel_manifest = _manifest_from_wheel(Path(ns.wheel))
    check(
        repo_manifest == wheel_manifest,
        "the wheel's manifest equals fractal_tasks/__FRACTAL_MANIFEST__.json",
    )
    try:
        manifest = ManifestV2(**wheel_manifest)
    except ValidationError as e:
        fatal(f"ManifestV2 rejects the manifest:\n{e}")
    say(
        f"ManifestV2 accepts the manifest ({len(manifest.task_list)} tasks, "
        f"has_args_schemas={manifest.has_args_schemas}, "
        f"args_schema_version={manifest.args_schema_version})"
    )
    check(manifest.has_args_schemas, "manifest has args schemas")
    by_name = {t.name: t for t in manifest.task_list}
    for name, (kind, init_exe, exe) in EXPECTED_TASKS.items():
        t = by_name.get(name)
        if not check(t is not None, f"manifest lists task {name!r}"):
            continue
        if kind == "compound":
            ok = (t.executable_non_parallel or "").endswith(init_exe) and (
                t.executable_parallel or ""
            ).endswith(exe)
            ok = ok and t.args_schema_non_parallel is not None
            ok = ok and t.args_schema_parallel is not None
        else:
            ok = t.executable_non_parallel is None and (
                t.executable_parallel or ""
            ).endswith(exe)
            ok = ok and t.args_schema_parallel is not None
        check(ok, f"{name!r} is {kind} with executables/schemas as expected")
    apply = by_name.get(APPLY)
    if apply is not None:
        check(
            apply.input_types.get("registered") is False
            and apply.output_types.get("registered") is True,
            f"{APPLY!r} has input_types registered=False, output_types registered=True",
        )
    if FAILURES:
        sys.exit(1)


# ---------------------------------------------------------------------------
# Throwaway wheel for --smoke
# ---------------------------------------------------------------------------
DUMMY_TASK = '''"""No-op Fractal task used by the e2e smoke test."""
import argparse
import json

parser = argparse.ArgumentParser()
parser.add_argument("--args-json", required=True)
parser.add_argument("--out-json", required=True)
ns = parser.parse_args()
with open(ns.args_json) as f:
    args = json.load(f)
print("noop task got", sorted(args))
if args.get("fail"):
    raise ValueError("noop task asked to fail: " + str(args["fail"]))
'''


def cmd_make_dummy_wheel(ns) -> None:
    """Write a tiny wheel with one no-op task (for --smoke) and print its path."""
    name, version = "fractal_e2e_dummy", "0.0.1"
    manifest = {
        "manifest_version": "2",
        "has_args_schemas": True,
        "args_schema_version": "pydantic_v2",
        "task_list": [
            {
                "name": "E2E noop",
                "executable_non_parallel": "noop.py",
                "args_schema_non_parallel": {
                    "title": "Noop",
                    "type": "object",
                    "properties": {
                        "zarr_urls": {"type": "array", "items": {"type": "string"}},
                        "zarr_dir": {"type": "string"},
                        "fail": {"type": "string"},
                    },
                    "required": ["zarr_urls", "zarr_dir"],
                    "additionalProperties": False,
                },
            }
        ],
    }
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{name}/noop.py": DUMMY_TASK,
        f"{name}/__FRACTAL_MANIFEST__.json": json.dumps(manifest, indent=2),
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: fractal-e2e-dummy\nVersion: {version}\n"
        ),
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: fractal-e2e\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = []
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest())
            record.append(f"{path},sha256={digest.decode().rstrip('=')},{len(data)}")
            zf.writestr(path, data)
        record.append(f"{dist}/RECORD,,")
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    out = Path(ns.out) / f"{name}-{version}-py3-none-any.whl"
    out.write_bytes(buf.getvalue())
    print(out)


# ---------------------------------------------------------------------------
# Server-side steps
# ---------------------------------------------------------------------------
def collect_wheel(api: Client, wheel: Path, timeout: float) -> dict:
    """Collect a wheel, wait for the activity, return the task group."""
    activity = api.post_file("/api/v2/task/collect/pip/", "file", wheel)
    say(f"collection of {wheel.name} started (activity {activity['id']})")
    return wait_collection(api, activity, timeout)


def collect_package(api: Client, package: str, version: str, timeout: float) -> dict:
    """Collect ``package==version`` from the package index; return the task group."""
    activity = api.post_file(
        "/api/v2/task/collect/pip/",
        None,
        None,
        fields={"package": package, "package_version": version},
    )
    say(f"collection of {package}=={version} started (activity {activity['id']})")
    return wait_collection(api, activity, timeout)


def wait_collection(api: Client, activity: dict, timeout: float) -> dict:
    """Poll a collection activity until it ends; return the task group."""
    t0 = time.time()
    last = None
    while True:
        activity = api.get(f"/api/v2/task-group/activity/{activity['id']}/")
        if activity["status"] != last:
            say(f"collection status: {activity['status']}")
            last = activity["status"]
        if activity["status"] in ("OK", "failed"):
            break
        if time.time() - t0 > timeout:
            print(activity.get("log") or "(no log)")
            fatal(f"collection did not finish within {timeout:.0f}s")
        time.sleep(3)
    if activity["status"] != "OK":
        print("----- collection log -----")
        print(activity.get("log") or "(no log)")
        print("--------------------------")
        fatal("task collection failed")
    say(f"collection OK in {time.time() - t0:.0f}s")
    # each collection script ends with "Elapsed: N seconds"
    elapsed = [
        ln.rsplit("Elapsed:", 1)[1].strip()
        for ln in (activity.get("log") or "").splitlines()
        if ln.startswith("[collect-task") and "Elapsed:" in ln
    ]
    if elapsed:
        say(f"collection scripts (venv, pip install, pip show): {', '.join(elapsed)}")
    return api.get(f"/api/v2/task-group/{activity['taskgroupv2_id']}/")


def route_args(task: dict, args: dict) -> tuple[dict | None, dict | None]:
    """Split workflow-task arguments into non-parallel/parallel by the schemas."""
    props_np = (task.get("args_schema_non_parallel") or {}).get("properties", {})
    props_p = (task.get("args_schema_parallel") or {}).get("properties", {})
    non_par, par = {}, {}
    for key, value in args.items():
        placed = False
        if key in props_np:
            non_par[key] = value
            placed = True
        if key in props_p:
            par[key] = value
            placed = True
        if not placed:
            fatal(f"argument {key!r} is in neither args schema of {task['name']!r}")
    if task["type"] == "parallel":
        return None, par
    if task["type"] == "non_parallel":
        return non_par, None
    return non_par, par


def make_workflow(api, project_id, name, steps, tasks_by_name, meta=None) -> int:
    """Create a workflow from (task name, args) steps; return its id.

    ``meta`` maps task names to their ``meta_parallel`` (SLURM resources).
    """
    wf = api.post(f"/api/v2/project/{project_id}/workflow/", {"name": name})
    payload = []
    for task_name, args in steps:
        task = tasks_by_name[task_name]
        non_par, par = route_args(task, args)
        item = {"task_id": task["id"]}
        if non_par:
            item["args_non_parallel"] = non_par
        if par:
            item["args_parallel"] = par
        if meta and task_name in meta:
            item["meta_parallel"] = meta[task_name]
        payload.append(item)
    created = api.post(
        f"/api/v2/project/{project_id}/workflow/{wf['id']}/wftask/", payload
    )
    say(
        f"workflow {name!r} (id {wf['id']}): "
        + " -> ".join(f"{w['task']['name']}" for w in created)
    )
    return wf["id"]


def run_job(api, project_id, workflow_id, dataset_id, timeout) -> dict:
    """Submit a job and poll it until it is no longer 'submitted'."""
    t0 = time.time()
    job = api.post(
        f"/api/v2/project/{project_id}/job/submit/",
        {},
        workflow_id=workflow_id,
        dataset_id=dataset_id,
    )
    say(f"job {job['id']} submitted")
    while job["status"] == "submitted":
        if time.time() - t0 > timeout:
            fatal(f"job {job['id']} did not finish within {timeout:.0f}s")
        time.sleep(2)
        job = api.get(f"/api/v2/project/{project_id}/job/{job['id']}/")
    took = time.time() - t0
    say(f"job {job['id']} ended with status {job['status']!r} in {took:.0f}s")
    return job


def dataset_images(api, project_id, dataset_id) -> list[dict]:
    """All images of a dataset (one unpaginated query)."""
    page = api.post(
        f"/api/v2/project/{project_id}/dataset/{dataset_id}/images/query/", {}
    )
    return page["items"]


def new_dataset(api, project_id, name, project_dir) -> dict:
    """Create a dataset whose zarr_dir is <project_dir>/zarr."""
    return api.post(
        f"/api/v2/project/{project_id}/dataset/",
        {"name": name, "project_dir": project_dir, "zarr_subfolder": "zarr"},
    )


def register_images(api, project_id, dataset_id, plate: dict) -> None:
    """Add the plate's images with the attributes/types a converter would set."""
    plate_name = Path(plate["plate_url"]).name
    for im in plate["images"]:
        api.post(
            f"/api/v2/project/{project_id}/dataset/{dataset_id}/images/",
            {
                "zarr_url": im["zarr_url"],
                "attributes": {
                    "plate": plate_name,
                    "well": im["row"] + im["column"],
                    "acquisition": im["acquisition"],
                },
                "types": {"is_3D": False},
            },
        )


def print_tail(text: str | None, n: int = 60) -> None:
    """Print the last ``n`` lines of a log."""
    lines = (text or "(no log)").rstrip().splitlines()
    print("\n".join(lines[-n:]))


def give_to_slurm_user(ns, path: str) -> None:
    """SLURM runs: the unprivileged SLURM user must own what the tasks write."""
    if ns.backend == "slurm":
        subprocess.run(["chown", "-R", f"{ns.slurm_user}:", path], check=True)


def check_task_logs(ns, job: dict) -> None:
    """No task log of a clean run may contain "warning" (any case).

    The logs are the files the server keeps in the job folder. Without
    ``--strict-logs`` the lines are listed but do not fail the test.
    """
    hits = task_log_warnings(Path(job["working_dir"]))
    n = sum(len(v) for v in hits.values())
    for log_file, lines in sorted(hits.items()):
        for ln in lines:
            say(f"warning line in {log_file}: {ln}")
    what = f"no task log of job {job['id']} contains 'warning' (any case)"
    if ns.strict_logs:
        check(n == 0, what + (f" -- {n} line(s) do" if n else ""))
    elif n:
        say(f"NOTE {n} 'warning' line(s) in task logs (not fatal: --strict-logs is off)")
    else:
        say(f"ok   {what} (--strict-logs is off)")


def task_log_warnings(job_dir: Path) -> dict[str, list[str]]:
    """Task log file (relative to the job folder) -> its lines with "warning"."""
    out: dict[str, list[str]] = {}
    for log_file in sorted(job_dir.glob("*/*-log.txt")):
        lines = [
            ln.rstrip()
            for ln in log_file.read_text(errors="replace").splitlines()
            if "warning" in ln.lower()
        ]
        if lines:
            out[str(log_file.relative_to(job_dir))] = lines
    return out


def cmd_smoke(ns) -> None:
    """Collect the throwaway wheel and run a passing and a failing job."""
    api = Client(ns.url)
    api.login(ns.email, ns.password)
    group = collect_wheel(api, Path(ns.wheel), ns.timeout)
    tasks = {t["name"]: t for t in group["task_list"]}
    check("E2E noop" in tasks, "collected task group lists the noop task")
    project = api.post("/api/v2/project/", {"name": "e2e-smoke"})
    ds = new_dataset(api, project["id"], "smoke", ns.project_dir)
    zarr_dir = ds["zarr_dir"]
    Path(zarr_dir, "img.zarr").mkdir(parents=True)
    give_to_slurm_user(ns, zarr_dir)
    api.post(
        f"/api/v2/project/{project['id']}/dataset/{ds['id']}/images/",
        {"zarr_url": f"{zarr_dir}/img.zarr", "types": {"is_3D": False}},
    )
    wf_ok = make_workflow(api, project["id"], "ok", [("E2E noop", {})], tasks)
    job = run_job(api, project["id"], wf_ok, ds["id"], ns.timeout)
    if not check(job["status"] == "done", "no-op job is done"):
        print_tail(job.get("log"))
    wf_bad = make_workflow(
        api, project["id"], "bad", [("E2E noop", {"fail": BAD_WAVELENGTH})], tasks
    )
    job = run_job(api, project["id"], wf_bad, ds["id"], ns.timeout)
    check(job["status"] == "failed", "failing no-op job is failed")
    check(BAD_WAVELENGTH in (job.get("log") or ""), "its log has the task's error text")
    finish(ns, {"mode": "smoke"})


def cmd_run(ns) -> None:
    """The full test: collection, registration workflow, checks, negative case."""
    work = Path(ns.work)
    api = Client(ns.url)
    api.login(ns.email, ns.password)
    summary: dict = {"mode": "full"}

    # --- collection -------------------------------------------------------
    t0 = time.time()
    group = collect_wheel(api, Path(ns.wheel), ns.timeout)
    summary["collection_s"] = round(time.time() - t0)
    tasks = {t["name"]: t for t in group["task_list"]}
    say(f"collected {group['pkg_name']} {group['version']}: {sorted(tasks)}")
    for name, (kind, _, _) in EXPECTED_TASKS.items():
        if check(name in tasks, f"server lists task {name!r}"):
            check(tasks[name]["type"] == kind, f"{name!r} has type {kind}")
    if FAILURES:
        finish(ns, summary)
    records = work / "measure"
    if ns.backend == "slurm" and ns.mem_check:
        measure = _measure_module()
        python = measure.task_python(next(iter(tasks.values())))
        measure.install_wrapper(python, records)
        say(f"{python} now runs under GNU time (peak memory per task, {records})")

    # --- project, dataset, synthetic plate ----------------------------------
    project = api.post("/api/v2/project/", {"name": "e2e-registration"})
    pid = project["id"]
    ds = new_dataset(api, pid, "plate", ns.project_dir)
    zarr_dir = ds["zarr_dir"]
    say(f"project {pid}, dataset {ds['id']} with zarr_dir {zarr_dir}")
    plate_json = work / "plate.json"
    subprocess.run(
        [
            ns.pkg_python,
            str(Path(ns.checks_dir) / "build_plate.py"),
            f"{zarr_dir}/plate.zarr",
            str(plate_json),
        ],
        check=True,
    )
    plate = json.loads(plate_json.read_text())
    give_to_slurm_user(ns, zarr_dir)
    register_images(api, pid, ds["id"], plate)
    inputs = [im["zarr_url"] for im in plate["images"]]
    check(
        sorted(i["zarr_url"] for i in dataset_images(api, pid, ds["id"]))
        == sorted(inputs),
        f"dataset holds the {len(inputs)} synthetic images",
    )

    # --- registration workflow ----------------------------------------------
    wf_id = make_workflow(
        api,
        pid,
        "registration",
        [
            (CALC, {"wavelength_id": "A01_C01", "level_path": "1"}),
            (CONSENSUS, {}),
            (
                APPLY,
                {
                    "registered_roi_table": "FOV_ROI_table_registered",
                    "overwrite_input": False,
                },
            ),
        ],
        tasks,
        meta=SLURM_META if ns.backend == "slurm" else None,
    )
    t0 = time.time()
    job = run_job(api, pid, wf_id, ds["id"], ns.timeout)
    summary["job_s"] = round(time.time() - t0)
    if not check(job["status"] == "done", "registration job is done"):
        print("----- job log -----")
        print_tail(job.get("log"), 120)
        print("-------------------")
    else:
        # --- image list ----------------------------------------------------
        images = dataset_images(api, pid, ds["id"])
        by_url = {i["zarr_url"]: i for i in images}
        registered = [i for i in images if i["zarr_url"] not in inputs]
        say(f"dataset now has {len(images)} images ({len(registered)} new)")
        check(len(registered) == len(inputs), "one new image per input image")
        for url in inputs:
            new = by_url.get(f"{url}_registered")
            name = url.split("plate.zarr/", 1)[-1] + "_registered"
            if not check(new is not None, f"{name} is in the dataset image list"):
                continue
            problems = []
            if new["types"].get("registered") is not True:
                problems.append(f"types={new['types']} lacks registered=True")
            if new.get("origin") != url:
                problems.append(f"origin={new.get('origin')!r} is not {url!r}")
            if new["attributes"] != by_url[url]["attributes"]:
                problems.append(
                    f"attributes {new['attributes']} differ from the input's"
                )
            if by_url[url]["types"].get("registered") is True:
                problems.append("its input became registered=True")
            check(
                not problems,
                f"{name}: registered=True, origin = input, input's attributes"
                + (f" -- {'; '.join(problems)}" if problems else ""),
            )
        images_json = work / "images.json"
        images_json.write_text(json.dumps(images, indent=2))
        # --- pixels ----------------------------------------------------------
        res = subprocess.run(
            [
                ns.pkg_python,
                str(Path(ns.checks_dir) / "check_pixels.py"),
                str(plate_json),
                str(images_json),
                "--wavelength-id",
                "A01_C01",
                "--roi-table",
                "FOV_ROI_table_registered",
            ],
        )
        check(res.returncode == 0, "pixel checks (check_pixels.py) pass")
        # --- task logs and (SLURM) CPUs and batching ---------------------------
        check_task_logs(ns, job)
        if ns.backend == "slurm":
            slurm_checks(ns, job, plate)
            if ns.mem_check:
                memory_checks(tasks, records)

    # --- negative case --------------------------------------------------------
    ds_bad = new_dataset(api, pid, "plate-bad-args", ns.project_dir)
    register_images(api, pid, ds_bad["id"], plate)
    wf_bad = make_workflow(
        api,
        pid,
        "bad-wavelength",
        [(CALC, {"wavelength_id": BAD_WAVELENGTH, "level_path": "1"})],
        tasks,
    )
    job_bad = run_job(api, pid, wf_bad, ds_bad["id"], ns.timeout)
    check(
        job_bad["status"] == "failed",
        f"job with wavelength_id={BAD_WAVELENGTH!r} fails",
    )
    log_bad = job_bad.get("log") or ""
    # the task's own error (an exception line naming the bad value), not just
    # any line that echoes the argument
    hits = [
        ln.strip()
        for ln in log_bad.splitlines()
        if BAD_WAVELENGTH in ln and "error" in ln.lower()
    ]
    if check(bool(hits), f"its job log has an error line naming {BAD_WAVELENGTH!r}"):
        say(f"error line: {hits[-1]}")
    else:
        print_tail(log_bad, 60)
    if ns.backend == "slurm":
        check(
            BAD_WAVELENGTH_MESSAGE in log_bad,
            f"its job log has our message {BAD_WAVELENGTH_MESSAGE!r}",
        )
    summary["images"] = len(inputs)
    finish(ns, summary)


def slurm_checks(ns, job: dict, plate: dict) -> None:
    """CPUs per step and batching of the SLURM jobs (see .ci/slurm/checks.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "slurm"))
    sys.dont_write_bytecode = True  # no __pycache__ in the source tree
    import checks as slurm_checks_mod

    expected = {name: meta for name, meta in SLURM_META.items()}
    wells = {im["zarr_url"]: im["well"] for im in plate["images"]}
    for ok, what in slurm_checks_mod.run_checks(
        job_dir=Path(job["working_dir"]),
        steps_log=Path(ns.slurm_dir) / "log" / "steps.log",
        jobcomp_log=Path(ns.slurm_dir) / "log" / "jobcomp.log",
        expected_meta=expected,
        well_of=wells,
        say=say,
    ):
        check(ok, what)


def _measure_module():
    """``.ci/e2e/measure.py`` (shared with benchmarks/bench_fractal_server.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
    sys.dont_write_bytecode = True  # no __pycache__ in the source tree
    import measure

    return measure


def memory_checks(tasks: dict, records: Path) -> None:
    """No task process used more memory than the ``mem`` its task declares.

    The peak is the process's own maximum RSS from GNU time. It must fit both
    the ``mem`` the step ran with (the workflow's ``meta_parallel``,
    SLURM_META, over the manifest's) and the manifest's own ``mem`` (MB, which
    SLURM reads as MiB). Records are consumed (moved aside) so that a later
    job is checked on its own.
    """
    measure = _measure_module()
    index = measure.script_index(list(tasks.values()))
    recs = measure.read_records(records)
    check(bool(recs), f"GNU time recorded the task processes ({len(recs)})")
    worst: dict[tuple[str, str], float] = {}
    for rec in recs:
        key = index.get(rec["script"])
        if key is not None:
            worst[key] = max(worst.get(key, 0.0), rec["peak_mib"])
    for (name, part), peak in sorted(worst.items()):
        ran = measure.declared_meta(tasks[name], part, SLURM_META.get(name))
        manifest = measure.declared_meta(tasks[name], part)
        limits = [m["mem"] for m in (ran, manifest) if m.get("mem") is not None]
        if not limits:
            continue
        check(
            peak <= min(limits),
            f"{name} ({part}): peak RSS {peak:.0f} MiB <= declared mem "
            f"{ran.get('mem')} MB (manifest: {manifest.get('mem')} MB)",
        )
    done = records / "checked"
    done.mkdir(exist_ok=True)
    for f in records.iterdir():
        if f.is_file():
            f.rename(done / f.name)


def finish(ns, summary: dict) -> None:
    """Print the summary and exit (1 if any check failed)."""
    print()
    print("=" * 70)
    print(f"fractal-server {ns.server_version} e2e ({summary.get('mode')})")
    for key in ("collection_s", "job_s", "images"):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    if FAILURES:
        print(f"  {len(FAILURES)} check(s) FAILED:")
        for f in FAILURES:
            print(f"   - {f}")
        print("=" * 70)
        sys.exit(1)
    print("  all checks passed")
    print("=" * 70)
    sys.exit(0)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("validate-manifest")
    p.add_argument("--repo-manifest", required=True)
    p.add_argument("--wheel", required=True)
    p = sub.add_parser("make-dummy-wheel")
    p.add_argument("--out", required=True)
    for name in ("run", "smoke"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--email", required=True)
        p.add_argument("--password", required=True)
        p.add_argument("--wheel", required=True)
        p.add_argument("--work", required=True)
        p.add_argument("--project-dir", required=True)
        p.add_argument("--timeout", type=float, default=1200)
        p.add_argument("--server-version", default="?")
        p.add_argument("--backend", choices=("local", "slurm"), default="local")
        p.add_argument("--slurm-user", default=None)
        p.add_argument("--slurm-dir", default=None)
        p.add_argument("--strict-logs", action="store_true")
        if name == "run":
            p.add_argument(
                "--no-mem-check",
                dest="mem_check",
                action="store_false",
                help="SLURM: do not run the tasks under GNU time to check their "
                "peak memory against the declared mem",
            )
            p.add_argument("--pkg-python", required=True)
            p.add_argument("--checks-dir", required=True)
    ns = parser.parse_args()
    try:
        {
            "validate-manifest": cmd_validate_manifest,
            "make-dummy-wheel": cmd_make_dummy_wheel,
            "run": cmd_run,
            "smoke": cmd_smoke,
        }[ns.cmd](ns)
    except ApiError as e:
        fatal(str(e))


if __name__ == "__main__":
    main()
