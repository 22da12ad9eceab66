"""Bad input: one clear line on stderr, exit code 2, never a traceback."""
import pytest
import torch

from conftest import run_cli


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_file(tmp_path):
    _one_line_error(run_cli("export", str(tmp_path / "nope.onnx")), "not found")


def test_truncated_onnx(tmp_path, int8_bundle):
    data = int8_bundle.bundle.model_path.read_bytes()
    f = tmp_path / "cut.onnx"
    f.write_bytes(data[: len(data) // 3])
    _one_line_error(run_cli("export", str(f), "-o", str(tmp_path / "o")), "not a readable ONNX model")
    _one_line_error(run_cli("inspect", str(f)), "not a readable ONNX model")


def test_a_tflite_given_to_export_names_the_commands_that_take_it(tmp_path):
    """A converted .tflite (a third-party one, as mediapipe ships) given to export: the line listed the
    suffixes export takes, and not that `run` and `inspect` take the file as it is."""
    f = tmp_path / "face_detection.tflite"
    f.write_bytes(b"TFL3" + bytes(60))
    _one_line_error(run_cli("export", str(f), "-o", str(tmp_path / "o")), "unsupported model type '.tflite'",
                    "lepton-edge run FILE", "lepton-edge inspect FILE", "the .onnx or PyTorch model it came from")
    assert not (tmp_path / "o").exists()


def test_non_model_pt(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("hello, not a model")
    _one_line_error(run_cli("export", str(f), "--input-shape", "1,3,8,8"), "not a TorchScript")
    sd = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, sd)
    _one_line_error(run_cli("export", str(sd), "--input-shape", "1,3,8,8"), "state_dict")


def test_unknown_target():
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--target", "raspberry4"), "unknown target")


def test_profile_with_wrong_field(tmp_path):
    f = tmp_path / "board.toml"
    f.write_text('id = "board"\ndescription = "x"\narch = "riscv"\n')
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--target", str(f)), "board.toml", "field 'arch'")


def test_empty_calibration_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--calib", str(tmp_path / "empty"), "-o", str(tmp_path)),
                    "no images")


def test_wrong_input_shape(tmp_path):
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--input-shape", "1,3,28,28", "-o", str(tmp_path)),
                    "does not accept input of shape")
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--input-shape", "1,a,28", "-o", str(tmp_path)),
                    "--input-shape")


def test_weights_that_do_not_match(tmp_path):
    from lepton_edge.zoo.fashion_cnn import FashionCNN

    f = tmp_path / "other.pth"
    torch.save(FashionCNN(width=16).state_dict(), f)
    _one_line_error(run_cli("export", "zoo:fashion-cnn", "--weights", str(f), "-o", str(tmp_path)),
                    "do not match", "features.0.0.weight")


@pytest.mark.parametrize("args,needle", [
    (["--max-size", "lots"], "--max-size"),
    (["--precision", "int4"], "int4"),
    (["--recipes", "q8-fast"], "recipe"),
])
def test_bad_flags(tmp_path, args, needle):
    _one_line_error(run_cli("export", "zoo:fashion-cnn", *args, "-o", str(tmp_path)), needle)
