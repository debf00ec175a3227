"""Keys are injective: different (dataset, speaker) pairs or (dataset, speaker, utterance) triples whose
names join into one key (``a_b/c`` and ``a/b_c`` -> ``a_b_c``) get told apart, from a tree, a manifest or
a Kaldi dir; every file is still embedded and the renames are listed (README "Input rules")."""
import json
import os
import random
import re

import numpy as np
import pytest

from speakerlab import manifest
from speakerlab import data
from speakerlab.data import DataError, Utterance, assign_keys, scan_tree
from speakerlab.scanfile import load as load_scan, save as save_scan
from tests.helpers import extract_cmd, merge_cmd, micro_model, run_cli, tone, write_wav

TAGGED = re.compile(r"^(.*)-([0-9a-f]{8})$")


def keys_of(scan):
    return {u.rel_path: (u.key, u.speaker_key) for u in scan.utterances}


def clash_tree(root):
    write_wav(root / "a_b" / "c" / "u1.wav", tone(0.3, seed=1))
    write_wav(root / "a_b" / "c" / "u2.wav", tone(0.3, seed=2))
    write_wav(root / "a" / "b_c" / "u1.wav", tone(0.3, seed=3))
    write_wav(root / "a" / "b_c" / "u3.wav", tone(0.3, seed=4))
    write_wav(root / "ds" / "spk" / "plain.wav", tone(0.3, seed=5))
    return root


def test_speakers_whose_names_join_into_one_key_stay_apart(tmp_path):
    scan = scan_tree(clash_tree(tmp_path))
    keys = keys_of(scan)
    assert scan.errors == []
    assert len(scan.utterances) == 5  # every file kept
    spk_ab_c, spk_a_bc = keys["a_b/c/u1.wav"][1], keys["a/b_c/u1.wav"][1]
    assert spk_ab_c != spk_a_bc
    for spk in (spk_ab_c, spk_a_bc):
        assert TAGGED.match(spk).group(1) == "a_b_c"
    assert keys["a_b/c/u2.wav"][1] == spk_ab_c and keys["a/b_c/u3.wav"][1] == spk_a_bc
    assert keys["a_b/c/u1.wav"][0] == f"{spk_ab_c}_u1" and keys["a/b_c/u1.wav"][0] == f"{spk_a_bc}_u1"
    assert keys["ds/spk/plain.wav"] == ("ds_spk_plain", "ds_spk")  # no clash: today's key exactly
    assert len({k for k, _ in keys.values()}) == 5
    renames = scan.renames
    speaker_renames = [r for r in renames if r["level"] == "speaker"]
    assert sorted((r["dataset"], r["speaker"], r["old"]) for r in speaker_renames) == [
        ("a", "b_c", "a_b_c"), ("a_b", "c", "a_b_c")]
    utterance_renames = {r["path"]: r for r in renames if r["level"] == "utterance"}
    assert set(utterance_renames) == {str(tmp_path / p) for p in keys if not p.startswith("ds/")}
    record = utterance_renames[str(tmp_path / "a" / "b_c" / "u3.wav")]
    assert (record["old"], record["new"], record["dataset"], record["speaker"], record["utterance"]) == (
        "a_b_c_u3", keys["a/b_c/u3.wav"][0], "a", "b_c", "u3")


def test_utterances_whose_names_join_into_one_key_stay_apart(tmp_path):
    write_wav(tmp_path / "ds" / "a_b" / "c.wav", tone(0.3, seed=1))   # speaker a_b, utterance c
    write_wav(tmp_path / "ds" / "a" / "b_c.wav", tone(0.3, seed=2))   # speaker a, utterance b_c
    write_wav(tmp_path / "ds" / "spk" / "v" / "1.wav", tone(0.3, seed=3))  # one speaker: v/1 and v_1
    write_wav(tmp_path / "ds" / "spk" / "v_1.wav", tone(0.3, seed=4))
    scan = scan_tree(tmp_path)
    keys = keys_of(scan)
    assert scan.errors == [] and len(keys) == 4
    assert keys["ds/a_b/c.wav"][1] == "ds_a_b" and keys["ds/a/b_c.wav"][1] == "ds_a"  # speakers differ already
    for rel, plain in (("ds/a_b/c.wav", "ds_a_b_c"), ("ds/a/b_c.wav", "ds_a_b_c"),
                       ("ds/spk/v/1.wav", "ds_spk_v_1"), ("ds/spk/v_1.wav", "ds_spk_v_1")):
        assert TAGGED.match(keys[rel][0]).group(1) == plain
    assert len({k for k, _ in keys.values()}) == 4
    assert [r["level"] for r in scan.renames] == ["utterance"] * 4


def test_one_utterance_twice_keeps_the_first(tmp_path):
    """u1.wav beside u1.flac is one (dataset, speaker, utterance) twice, not a clash of names: the
    first walked keeps its key, the other is a scan record saying why."""
    write_wav(tmp_path / "ds" / "spk" / "u1.flac", tone(0.2))
    write_wav(tmp_path / "ds" / "spk" / "u1.wav", tone(0.2))
    scan = scan_tree(tmp_path)
    assert [(u.key, os.path.basename(u.path)) for u in scan.utterances] == [("ds_spk_u1", "u1.flac")]
    assert scan.renames == []
    [error] = scan.errors
    assert os.path.basename(error["path"]) == "u1.wav" and error["stage"] == "scan"
    assert "two files map to one key" in error["reason"] and "u1.flac" in error["reason"]


def test_keys_do_not_depend_on_the_order_of_reading():
    names = [("a_b", "c", "u1"), ("a", "b_c", "u1"), ("a", "b_c", "u2"), ("ds", "x_y", "z"), ("ds", "x", "y_z"),
             ("ds", "s", "u")]

    def assigned(order):
        utts = [Utterance(key="", dataset=d, speaker=s, utterance=u, path=f"/{d}/{s}/{u}.wav") for d, s, u in order]
        renames = assign_keys(utts)
        return {(u.dataset, u.speaker, u.utterance): (u.key, u.speaker_key) for u in utts}, renames

    reference, renames = assigned(names)
    assert len({k for k, _ in reference.values()}) == len(names)
    assert len({s for _, s in reference.values()}) == 5
    assert reference[("ds", "s", "u")] == ("ds_s_u", "ds_s")
    rng = random.Random(0)
    for _ in range(5):
        order = names[:]
        rng.shuffle(order)
        assert assigned(order) == (reference, renames)


def test_a_name_made_to_match_a_tagged_key_gets_a_longer_tag():
    """Even a speaker literally named like another's tagged key cannot take that key."""
    def make(names):
        utts = [Utterance(key="", dataset=d, speaker=s, utterance=u, path="") for d, s, u in names]
        assign_keys(utts)
        return utts

    first = make([("a_b", "c", "u"), ("a", "b_c", "u")])
    tagged = first[0].speaker_key                       # a_b_c-xxxxxxxx
    utts = make([("a_b", "c", "u"), ("a", "b_c", "u"), ("a", tagged[2:], "u")])
    speaker_keys = [u.speaker_key for u in utts]
    assert len(set(speaker_keys)) == 3 and len({u.key for u in utts}) == 3
    assert tagged in speaker_keys  # the natural owner of that text keeps it; the others grew their tags
    assert all(len(k.rsplit("-", 1)[1]) > 8 for k in speaker_keys if k != tagged)


def test_manifest_names_that_join_into_one_key(tmp_path):
    (tmp_path / "m.csv").write_text("path,dataset,speaker,utterance\n"
                                    "x.wav,a_b,c,u1\ny.wav,a,b_c,u1\nz.wav,a,b_c,u2\nw.wav,d,s,u\n")
    scan = manifest.read_manifest(tmp_path / "m.csv")
    by_path = {os.path.basename(u.path): u for u in scan.utterances}
    assert by_path["w.wav"].key == "d_s_u"
    assert by_path["x.wav"].speaker_key != by_path["y.wav"].speaker_key == by_path["z.wav"].speaker_key
    assert len({u.key for u in scan.utterances}) == 4
    assert {r["old"] for r in scan.renames} == {"a_b_c", "a_b_c_u1", "a_b_c_u2"}
    # one (dataset, speaker, utterance) given twice is still refused, naming both lines
    (tmp_path / "dup.csv").write_text("path,dataset,speaker,utterance\nx.wav,d,s,u\ny.wav,d,s,u\n")
    with pytest.raises(DataError, match=r"dup.csv:2 and .*dup.csv:3 both give dataset 'd', speaker 's', "
                                        r"utterance 'u'"):
        manifest.read_manifest(tmp_path / "dup.csv")


def test_kaldi_names_that_join_into_one_key(tmp_path):
    kd = tmp_path / "corpus"
    kd.mkdir()
    (kd / "wav.scp").write_text("b_c /x/1.wav\nc /x/2.wav\nq /x/3.wav\n")
    (kd / "utt2spk").write_text("b_c a\nc a_b\nq s\n")   # corpus_a_b_c twice
    scan = manifest.read_kaldi_dir(kd)
    keys = sorted(u.key for u in scan.utterances)
    assert len(set(keys)) == 3 and "corpus_s_q" in keys
    assert sorted(TAGGED.match(k).group(1) for k in keys if k != "corpus_s_q") == ["corpus_a_b_c"] * 2


def test_scan_json_keeps_keys_and_renames(tmp_path):
    scan = scan_tree(clash_tree(tmp_path / "data"))
    save_scan(scan, tmp_path / "scan.npz")
    again = load_scan(tmp_path / "scan.npz")
    assert keys_of(again) == keys_of(scan) and again.renames == scan.renames


@pytest.mark.slow
def test_clashing_names_end_to_end(tmp_path):
    """Extract + merge: two speakers, each with their own embedding and statistics; every file
    embedded; the renames warned about and listed in summary.json; a rerun resumes (keys stable)."""
    model = micro_model(tmp_path / "model")
    clash_tree(tmp_path / "data")
    cmd = extract_cmd(tmp_path / "data", tmp_path / "tmp", *model, "--num_workers", "0")
    run = run_cli(cmd)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 speaker key(s) and 4 utterance key(s) renamed" in run.stderr
    merged = run_cli(merge_cmd(tmp_path / "tmp", tmp_path / "final"))
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "6 keys were renamed" in merged.stderr
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    speakers = {s["key"]: s for s in json.loads((tmp_path / "final" / "speaker_list.json").read_text())}
    utts = json.loads((tmp_path / "final" / "utterance_list.json").read_text())
    assert summary["total_utterances"] == 5 and summary["failures"] == 0 and summary["total_speakers"] == 3
    assert sorted((s["dataset"], s["speaker_id"], s["num_utterances"]) for s in speakers.values()) == [
        ("a", "b_c", 2), ("a_b", "c", 2), ("ds", "spk", 1)]
    assert {u["speaker_key"] for u in utts} == set(speakers)
    renames = summary["key_renames"]
    assert len(renames) == 6 and {r["level"] for r in renames} == {"speaker", "utterance"}
    assert {r["new"] for r in renames if r["level"] == "utterance"} == {u["key"] for u in utts} - {"ds_spk_plain"}
    with np.load(tmp_path / "final" / "utterance_embeddings.npz", allow_pickle=False) as data:
        assert len(set(map(str, data["keys"]))) == 5
    again = run_cli(cmd)
    assert again.returncode == 0 and "already complete" in again.stderr, again.stderr[-2000:]


def test_merge_refuses_one_speaker_key_for_two_speakers_of_two_runs(tmp_path):
    """Each run alone has no clash; merged, a_b/c and a/b_c would become one speaker."""
    model = micro_model(tmp_path / "model")
    write_wav(tmp_path / "one" / "a_b" / "c" / "u1.wav", tone(0.3, seed=1))
    write_wav(tmp_path / "two" / "a" / "b_c" / "u2.wav", tone(0.3, seed=2))
    for name in ("one", "two"):
        run = run_cli(extract_cmd(tmp_path / name, tmp_path / f"tmp_{name}", *model, "--num_workers", "0"))
        assert run.returncode == 0, run.stderr[-2000:]
    cmd = merge_cmd(tmp_path / "tmp_one", tmp_path / "final")
    merged = run_cli(cmd[:4] + [tmp_path / "tmp_two"] + cmd[4:])
    assert merged.returncode == 2, merged.stderr[-2000:]
    assert "speaker key 'a_b_c' names two speakers in different runs" in merged.stderr
    assert "Traceback" not in merged.stderr


def test_lean_key_assignment_equals_the_whole_table_rule():
    """assign_keys finds clashes as neighbours in key order; it must give exactly the keys of the
    plain rule: _unique_keys over every (dataset, speaker) and every (dataset, speaker, raw id)."""
    from speakerlab.data import _unique_keys
    rng = random.Random(3)
    parts = ["a", "b", "a_b", "b_a", "c", "a_b_c", "x"]
    for trial in range(30):
        triples = {(rng.choice(parts), rng.choice(parts), "/".join(rng.choice(parts) for _ in range(rng.randint(1, 2))))
                   for _ in range(rng.randint(2, 40))}
        triples = sorted(triples)
        utts = [Utterance(key=f"{d}_{s}_{r.replace('/', '_')}", dataset=d, speaker=s, utterance=r.replace("/", "_"),
                          path=f"/{d}/{s}/{r}.wav", rel_path=f"{d}/{s}/{r}.wav") for d, s, r in triples]
        assign_keys(utts, data.tree_raw_id)
        speakers = _unique_keys({(d, s): f"{d}_{s}" for d, s, _ in triples})
        keys = _unique_keys({(d, s, r): f"{speakers[(d, s)]}_{r.replace('/', '_')}" for d, s, r in triples})
        assert [u.key for u in utts] == [keys[t] for t in triples], trial
        assert [u.speaker_key for u in utts] == [speakers[t[:2]] for t in triples], trial
        assert len({u.key for u in utts}) == len(utts)
