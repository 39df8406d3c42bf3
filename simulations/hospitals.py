"""Simulated hospitals: one FHIR R4 Bulk export of clinical notes per site, made with clinosim.

clinosim simulates a catchment population forward through a quarter of care and writes a
full FHIR export. Sites differ in the knobs clinosim really has, so the federation is non-IID:
size (0.6x..1.4x), facility (a clinic refers surgery out, a tertiary centre has
more departments and beds), season (respiratory infections peak in winter) and seed.

Only the note-bearing resources are kept (as a Bulk `$export?_type=...` would), because the
other resource types are large and nothing here trains on them. Exports are cached: a
manifest written after the data says which spec produced them.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import clinosim
from clinosim.api import SimulatorConfig, convert_cif_to_fhir, run_beta

LOG = logging.getLogger(__name__)
_PROJECT_ROOT = Path(__file__).resolve().parent.parent

# clinosim's bundled hospital operations presets; None is its default 50-bed community hospital.
FACILITIES: dict[str, str | None] = {
    "clinic": "hospital_small.yaml",
    "community": None,
    "tertiary": "hospital_large.yaml",
}
# One quarter of 2024 each; clinosim applies monthly seasonal incidence modifiers.
SEASONS: dict[str, tuple[str, str]] = {
    "winter": ("2024-01-01", "2024-03-31"),
    "spring": ("2024-04-01", "2024-06-30"),
    "summer": ("2024-07-01", "2024-09-30"),
    "autumn": ("2024-10-01", "2024-12-31"),
}
# Share of clinosim's catchment population that has a note in one quarter (measured 0.37-0.51
# across facilities and seasons): sizes are asked for in patients, clinosim wants residents.
PATIENTS_PER_RESIDENT = 0.45
# About 3-3.5 notes per patient, so the default 0.6x..1.4x sites have roughly 200-600 notes each.
DEFAULT_PATIENTS = 120
EXPORTED_TYPES = ("Patient", "DocumentReference", "Composition")
MANIFEST_NAME = "privatune-export.json"
# Bump when the export layout changes, so old caches are regenerated.
EXPORT_LAYOUT = 1
# Site names become directory names and part of FHIR ids ([A-Za-z0-9-.]{1,64}).
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,31}$")


@dataclass(frozen=True)
class HospitalSpec:
    """Everything that determines one simulated site's export."""

    name: str
    seed: int
    patients: int  # about this many patients have notes; clinosim draws them from its population
    facility: str = "community"  # a key of FACILITIES
    season: str = "winter"  # a key of SEASONS

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise ValueError(f"hospital name {self.name!r} must be 1-32 letters, digits, '.' or '-'")
        if self.patients < 1:
            raise ValueError(f"hospital {self.name}: patients must be positive, got {self.patients}")
        if self.facility not in FACILITIES:
            raise ValueError(f"hospital {self.name}: unknown facility {self.facility!r} "
                             f"(expected one of {', '.join(FACILITIES)})")
        if self.season not in SEASONS:
            raise ValueError(f"hospital {self.name}: unknown season {self.season!r} "
                             f"(expected one of {', '.join(SEASONS)})")

    @property
    def catchment_population(self) -> int:
        """The number of residents clinosim simulates to yield about `patients` patients."""
        return max(1, round(self.patients / PATIENTS_PER_RESIDENT))


def default_hospitals(n: int, base_seed: int, patients: int = DEFAULT_PATIENTS) -> list[HospitalSpec]:
    """N non-IID sites: sizes spread over 0.6x..1.4x `patients`, the smallest sites are clinics
    and the largest tertiary centres, and the seasons rotate."""
    if n < 1:
        raise ValueError(f"need at least one hospital, got {n}")
    seasons = list(SEASONS)
    facilities = list(FACILITIES)
    specs = []
    for index in range(n):
        scale = 1.0 if n == 1 else 0.6 + 0.8 * index / (n - 1)
        specs.append(HospitalSpec(
            name=f"hospital-{index + 1}",
            seed=base_seed * 1000 + index + 1,
            patients=max(1, round(patients * scale)),
            facility=facilities[(2 * index + 1) * len(facilities) // (2 * n)],
            season=seasons[index % len(seasons)],
        ))
    return specs


def generate_hospital_export(spec: HospitalSpec, out_dir: Path) -> Path:
    """Write the site's FHIR NDJSON export to `out_dir` unless a complete one for `spec` is there.

    The export is built in a sibling directory and moved into place only after its manifest is
    written, so an interrupted run never leaves something that looks complete.
    """
    out_dir = Path(out_dir)
    if export_is_current(spec, out_dir):
        LOG.info("hospital %s: reusing cached export %s", spec.name, out_dir)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).exists():
        raise FileExistsError(f"{out_dir}: exists and is not a simulated hospital export; "
                              "refusing to replace it")
    started = time.perf_counter()
    LOG.info("hospital %s: simulating %d residents (%s, %s) with clinosim", spec.name,
             spec.catchment_population, spec.facility, spec.season)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix="clinosim-") as work:
            full_export = _run_clinosim(spec, Path(work))
            _keep_note_resources(full_export, partial, spec.name)
        _write_json(partial / MANIFEST_NAME, _manifest(spec, partial))
        shutil.rmtree(out_dir, ignore_errors=True)
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    LOG.info("hospital %s: export written to %s in %.1f s", spec.name, out_dir,
             time.perf_counter() - started)
    return out_dir


def generate_federation(specs: Sequence[HospitalSpec], cache_dir: Path) -> dict[str, Path]:
    """One cached export per site under `cache_dir/<name>`; returns name -> export directory.

    clinosim is single-threaded, so sites missing from the cache are simulated in parallel, one
    worker process per CPU. Workers are fresh interpreters (not forks, not multiprocessing):
    that is safe whatever threads the caller runs and whatever its `__main__` does.
    """
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"hospital names must be unique; repeated: {', '.join(duplicates)}")
    exports = {spec.name: Path(cache_dir) / spec.name for spec in specs}
    missing = [spec for spec in specs if not export_is_current(spec, exports[spec.name])]
    workers = min(len(missing), os.cpu_count() or 1)
    if workers <= 1:
        for spec in missing:
            generate_hospital_export(spec, exports[spec.name])
        return exports
    # Each worker pays clinosim's start-up once, so sites are dealt out in balanced batches.
    batches: list[list[HospitalSpec]] = [[] for _ in range(workers)]
    for spec in sorted(missing, key=lambda spec: spec.patients, reverse=True):
        min(batches, key=lambda batch: sum(s.patients for s in batch)).append(spec)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda batch: _generate_in_worker(batch, exports), batches))
    return exports


def _generate_in_worker(batch: Sequence[HospitalSpec], exports: dict[str, Path]) -> None:
    started = time.perf_counter()
    names = ", ".join(spec.name for spec in batch)
    LOG.info("simulating %s with clinosim in a worker process", names)
    jobs = [[asdict(spec), str(exports[spec.name])] for spec in batch]
    python_path = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-m", "privatune.simulations.hospitals", json.dumps(jobs)],
                            env={**os.environ, "PYTHONPATH": python_path}, capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"simulating {names} failed:\n{result.stderr[-4000:]}")
    LOG.info("exports of %s written in %.1f s", names, time.perf_counter() - started)


def export_is_current(spec: HospitalSpec, out_dir: Path) -> bool:
    """Whether `out_dir` holds a complete export made from exactly this spec and clinosim version."""
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return False
    if {key: manifest.get(key) for key in ("spec", "clinosim", "layout")} != _identity(spec):
        return False
    return all(_file_size(Path(out_dir) / name) == size for name, size in manifest["files"].items())


def _identity(spec: HospitalSpec) -> dict[str, object]:
    return {"spec": asdict(spec), "clinosim": clinosim.__version__, "layout": EXPORT_LAYOUT}


def _manifest(spec: HospitalSpec, export_dir: Path) -> dict[str, object]:
    data_files = sorted(path.name for path in export_dir.iterdir() if path.name != MANIFEST_NAME)
    return {**_identity(spec), "files": {name: (export_dir / name).stat().st_size for name in data_files}}


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _run_clinosim(spec: HospitalSpec, work: Path) -> Path:
    """Simulate, narrate and export the site with clinosim; returns its full FHIR export dir."""
    # Imported here: these are clinosim's CLI pipeline steps, outside its pinned api module.
    from clinosim.modules.document.narrative.passes import TemplateNarrativePass
    from clinosim.modules.output.cif_writer import write_cif

    start, end = SEASONS[spec.season]
    preset = FACILITIES[spec.facility]
    config = SimulatorConfig(country="US", random_seed=spec.seed,
                             catchment_population=spec.catchment_population,
                             time_range=(start, end), snapshot_date=end)
    cif_dir, fhir_dir = work / "cif", work / "fhir"
    with _quiet_clinosim():
        dataset = run_beta(config, hospital_config_path=str(files("clinosim") / "config" / preset)
                           if preset else None)
        write_cif(dataset, str(cif_dir))
        TemplateNarrativePass(cif_dir=str(cif_dir), version_id="template", country="US",
                              rng_seed=spec.seed).run()
        convert_cif_to_fhir(str(cif_dir), str(fhir_dir), country="US", narrative_version="template")
    return fhir_dir


@contextlib.contextmanager
def _quiet_clinosim() -> Iterator[None]:
    """Silence clinosim's progress prints and its per-record log events for the duration."""
    clinosim_logger = logging.getLogger("clinosim")
    previous_level = clinosim_logger.level
    clinosim_logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        clinosim_logger.setLevel(previous_level)


def _keep_note_resources(full_export: Path, export_dir: Path, site: str) -> None:
    """Copy the note-bearing resources over, with patient ids qualified by the site name, and
    write a Bulk Data manifest listing them.

    clinosim numbers the people of every run the same way (POP-000001, ...), so unqualified
    ids of two sites would collide and pooled records would merge different patients.
    """
    bulk_manifest = json.loads((full_export / "manifest.json").read_text(encoding="utf-8"))
    kept = []
    for resource_type in EXPORTED_TYPES:
        source = full_export / f"{resource_type}.ndjson"
        if not source.exists():
            continue
        with source.open(encoding="utf-8") as lines, (export_dir / source.name).open(
                "w", encoding="utf-8") as out:
            for line in lines:
                resource = json.loads(line)
                if resource_type == "Patient":
                    resource["id"] = f"{site}-{resource['id']}"
                out.write(json.dumps(_qualify_patient_references(resource, site), ensure_ascii=False)
                          + "\n")
        kept.append({"type": resource_type, "url": source.name})
    bulk_manifest["request"] = f"$export?_type={','.join(EXPORTED_TYPES)}"
    bulk_manifest["output"] = kept
    _write_json(export_dir / "manifest.json", bulk_manifest)


def _qualify_patient_references(value: Any, site: str) -> Any:
    if isinstance(value, dict):
        reference = value.get("reference")
        if isinstance(reference, str) and reference.startswith("Patient/"):
            value["reference"] = f"Patient/{site}-{reference.removeprefix('Patient/')}"
        for item in value.values():
            _qualify_patient_references(item, site)
    elif isinstance(value, list):
        for item in value:
            _qualify_patient_references(item, site)
    return value


def _write_json(path: Path, value: object) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())


if __name__ == "__main__":  # a worker of generate_federation: JSON list of [spec, out_dir]
    for spec_fields, out_dir in json.loads(sys.argv[1]):
        generate_hospital_export(HospitalSpec(**spec_fields), Path(out_dir))
