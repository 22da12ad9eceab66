import json

import pytest

from conftest import run_cli
from lepton_edge import targets
from lepton_edge.errors import BadInput

REQUIRED = {"rpi4", "rpi5", "jetson-orin-nano", "x86-cpu", "cuda-gpu", "generic-arm64"}


def test_builtin_profiles_load_with_budgets():
    ids = set(targets.builtin_ids())
    assert ids >= REQUIRED
    for p in targets.all_profiles():
        assert p.max_model_bytes > 0 and p.ram_budget_bytes > 0 and p.latency_budget_ms > 0 and p.max_opset >= 13
        assert p.device_packages, p.id
        assert len(p.content_hash()) == 64


def test_quantization_follows_the_target():
    # NNCF's default PTQ is tried first where a profile lists it; among onnxruntime's recipes, x86 AVX2
    # without VNNI takes uint8 activations (the fast choice) first, ARM int8 activations (S8S8).
    def first_ort(profile):
        return next(r for r in targets.load(profile).quantization.recipes if not r.startswith("nncf-"))

    assert targets.load("x86-cpu").quantization.recipes[0] == "nncf-default"
    assert first_ort("x86-cpu").startswith("u8-")
    for arm in ("rpi4", "rpi5", "generic-arm64"):
        assert targets.load(arm).quantization.recipes[0] == "nncf-default", arm
        assert first_ort(arm).startswith("s8-")


def test_user_profile_from_path(tmp_path):
    text = (targets.Path(targets.__file__).parent / "rpi4.toml").read_text().replace('id = "rpi4"', 'id = "my-board"')
    f = tmp_path / "my-board.toml"
    f.write_text(text)
    assert targets.load(str(f)).id == "my-board"


def test_wrong_field_names_field_and_file(tmp_path):
    f = tmp_path / "bad.toml"
    rpi4 = (targets.Path(targets.__file__).parent / "rpi4.toml").read_text()
    f.write_text(rpi4.replace("threads = 4", 'threads = "four"'))
    with pytest.raises(BadInput, match=r"bad.toml: field 'threads'"):
        targets.load(str(f))
    f.write_text(rpi4.replace('"s8-minmax",', '"s9-minmax",'))
    with pytest.raises(BadInput, match=r"field 'quantization.recipes'"):
        targets.load(str(f))
    f.write_text(rpi4.replace('"s8-minmax",', '"s8-minmax-ends-ends",'))  # an option twice: no recipe of its own
    with pytest.raises(BadInput, match=r"field 'quantization.recipes'.*named twice"):
        targets.load(str(f))


def test_cli_targets_table_and_json():
    r = run_cli("targets")
    assert r.returncode == 0 and "rpi4" in r.stdout and "jetson-orin-nano" in r.stdout
    r = run_cli("targets", "show", "rpi4", "--json")
    assert json.loads(r.stdout)["arch"] == "aarch64"


def test_cli_unknown_target_suggests():
    r = run_cli("targets", "show", "rpi-4")
    assert r.returncode == 2
    assert "rpi4" in r.stderr and "Traceback" not in r.stderr


# ---- a profile cannot contradict itself ---------------------------------------------------------
def _variant(tmp_path, base: str, **fields) -> str:
    """A copy of a built-in profile with top-level `fields` replaced (TOML literals), as a user would edit it."""
    lines = (targets._builtin_dir() / f"{base}.toml").read_text().splitlines()
    keep = [ln for ln in lines if ln.split("=")[0].strip() not in fields]
    f = tmp_path / "foo.toml"
    f.write_text("\n".join([f"{k} = {v}" for k, v in fields.items()] + keep) + "\n")
    return str(f)


@pytest.mark.parametrize("base,fields,field,needle", [
    ("rpi4", {"format": '"onnx"'}, "format", "'onnx' cannot run on runtime 'litert' (litert runs tflite)"),
    ("x86-cpu", {"format": '"tflite"'}, "format", "'tflite' cannot run on runtime 'onnxruntime'"),
    ("x86-cpu", {"delegates": '["XNNPACK"]'}, "delegates", "runtime 'onnxruntime' takes `execution_providers`"),
    ("rpi4", {"execution_providers": '["CUDAExecutionProvider"]'}, "execution_providers",
     "runtime 'litert' takes `delegates`"),
    ("x86-cpu", {"execution_providers": '["CUDAExecutionProvider", "CPUExecutionProvider"]'}, "device_packages",
     "needs 'onnxruntime-gpu'"),
    ("x86-cpu", {"execution_providers": '["CPUExecutionProvider", "CPUExecutionProvider"]'}, "execution_providers",
     "twice"),
    ("x86-cpu", {"execution_providers": '["/usr/lib/libcuda.so"]'}, "execution_providers.0", "pattern"),
    ("x86-cpu", {"execution_providers": "[]"}, "execution_providers", "at least 1"),
    ("rpi4", {"delegates": '["/usr/lib/libedgetpu.so.1"]'}, "delegates.0", "pattern"),
    ("rpi4", {"max_model_bytes": 1073741824}, "ram_budget_bytes", "a model has to fit in memory"),
    ("rpi4", {"threads": 0}, "threads", "greater than or equal to 1"),
    ("rpi4", {"latency_budget_ms": 0}, "latency_budget_ms", "greater than 0"),
    ("rpi4", {"ram_budget_bytes": -1}, "ram_budget_bytes", "greater than 0"),
    ("rpi4", {"id": '"../../etc"'}, "id", "pattern"),
    # TOML has types: a boolean, a string or a float where an integer is due is a mistake, not read as 1, 4, 1500000
    ("rpi4", {"threads": "true"}, "threads", "valid integer"),
    ("rpi4", {"threads": '"4"'}, "threads", "valid integer"),
    ("rpi4", {"max_model_bytes": "1.5e6"}, "max_model_bytes", "valid integer"),
    ("rpi4", {"input_size": "[224.0, 224]"}, "input_size.0", "valid integer"),
])
def test_an_impossible_profile_is_one_line_naming_file_and_field(tmp_path, base, fields, field, needle):
    path = _variant(tmp_path, base, **fields)
    with pytest.raises(BadInput) as e:
        targets.load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: field '{field}': ") and "\n" not in msg, msg
    assert needle in msg, msg


def test_the_cli_reports_an_impossible_profile_on_one_line(tmp_path):
    path = _variant(tmp_path, "rpi4", format='"onnx"')
    r = run_cli("targets", "show", path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "foo.toml: field 'format': 'onnx' cannot run on runtime 'litert'" in lines[0], r.stderr


def test_what_the_shipped_profiles_combine_still_loads(tmp_path):
    # the combinations the built-in profiles rely on stay valid: GPU providers with their wheel, a LiteRT
    # target naming the CPU provider its ONNX export runs with (profiles written before the check did)
    for p in targets.all_profiles():
        assert targets.RUNTIME_FORMAT[p.runtime] == p.format and (p.runtime == "litert" or not p.delegates)
    assert targets.load(_variant(tmp_path, "rpi4", execution_providers='["CPUExecutionProvider"]')).runtime == "litert"
    assert targets.load("jetson-orin-nano").execution_providers[0] == "TensorrtExecutionProvider"


@pytest.mark.parametrize("line", ['numpy = "2.4.6\\n/tmp/evilpkg"', 'numpy = "/tmp/evilpkg"', 'numpy = "--index-url"',
                                  '"numpy @ file:///tmp/x" = "1.0"', '"-e /tmp/x" = "1.0"'])
def test_device_packages_are_names_and_versions_never_requirement_lines(tmp_path, line):
    """`kit` writes device_packages as `name==version` lines into requirements.txt, downloads them and the
    device installs them as root: a newline in a version added a line naming a local folder, whose
    setup.py pip ran on the operator's machine."""
    text = (targets._builtin_dir() / "rpi4.toml").read_text()
    f = tmp_path / "inject.toml"
    f.write_text(text.replace('numpy = "2.4.6"', line) if line.startswith("numpy")
                 else text.replace("[device_packages]\n", f"[device_packages]\n{line}\n", 1))
    with pytest.raises(BadInput, match=r"field 'device_packages\.[^']*': String should match pattern"):
        targets.load(f)


def test_a_bare_word_is_a_builtin_id_even_beside_a_file_of_that_name(tmp_path, monkeypatch):
    """A folder `rpi4/` (an output folder) in the working directory made `--target rpi4` fail, and a file
    `rpi4` replaced the built-in profile. A user's own profile is a path (./rpi4, x.toml); a FIFO or a
    folder given as one is one line, a UTF-8 byte-order mark (Windows editors) is no error."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rpi4").mkdir()
    (tmp_path / "x86-cpu").write_text("id = 'evil'\n")
    assert targets.load("rpi4").source == "targets/rpi4.toml" and targets.load("x86-cpu").id == "x86-cpu"
    with pytest.raises(BadInput, match="not a regular file"):
        targets.load("./rpi4")
    import os
    os.mkfifo(tmp_path / "fifo.toml")
    with pytest.raises(BadInput, match="not a regular file"):
        targets.load("fifo.toml")
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf" + (targets._builtin_dir() / "rpi4.toml").read_bytes())
    assert targets.load(bom).id == "rpi4"


@pytest.mark.parametrize("old,new,field", [
    ("per_channel = true", 'per_channel = "yes"', "quantization.per_channel"),
    ("calibration_samples = 400", "calibration_samples = 4e2", "quantization.calibration_samples"),
    ('numpy = "2.4.6"', 'numpy = "2.4.6"\nNUMPY = "1.0"', "device_packages"),
    ('numpy = "2.4.6"', 'numpy = "2.4.6"\nruamel_yaml = "0.18"\n"ruamel.yaml" = "0.17"', "device_packages"),
])
def test_a_profile_value_of_the_wrong_type_or_a_package_twice_is_refused(tmp_path, old, new, field):
    """Strict types in [quantization] too (`per_channel = "yes"` read as true), and a package listed twice
    under pip's name comparison (PEP 503: case, '.', '_' and '-' alike): pip sees one project, and which
    pin the kit took was arbitrary."""
    text = (targets._builtin_dir() / "rpi4.toml").read_text()
    assert old in text
    f = tmp_path / "lax.toml"
    f.write_text(text.replace(old, new))
    with pytest.raises(BadInput) as e:
        targets.load(f)
    assert str(e.value).startswith(f"{f}: field '{field}': "), str(e.value)
    if field == "device_packages":
        msg = str(e.value)
        assert "'NUMPY' is 'numpy' again" in msg or "'ruamel.yaml' is 'ruamel_yaml' again" in msg, msg


def test_the_kit_pins_a_package_whatever_spelling_the_profile_gives():
    """device_requirements compares names as pip does: `opencv_python.Headless` in a profile pins the
    project's opencv-python-headless dependency (a plain lower() left it unpinned)."""
    from lepton_edge import kit

    requires = ["numpy>=1.26", "opencv-python-headless>=4.8", 'onnxruntime>=1.17; extra == "device-onnx"']
    lines = kit.device_requirements("onnx", {"opencv_python.Headless": "5.0.0.93", "NumPy": "2.4.6",
                                             "onnxruntime": "1.32.0"}, requires)
    assert lines == ["numpy==2.4.6", "onnxruntime==1.32.0", "opencv-python-headless==5.0.0.93"], lines
