"""Tripwire: every branch of the installed transformers that treats Whisper apart from other models.

transformers takes Whisper's path by `config.model_type == "whisper"`, by class (isinstance, class names) or by the ASR
pipeline's `type`. A Whisper-MLA model keeps its own model_type (so that loading it without its code fails loudly), so
each such branch it reaches must be handled in the remote-code files. This test parses transformers' sources and fails,
naming file and line, on any branch not listed below: a transformers upgrade cannot silently reopen issue 31.
"""

import ast
from pathlib import Path

import transformers


# (file under transformers/, the branch's source) -> how Whisper-MLA takes Whisper's path, and the test that proves it
HANDLED = {
    ("generation/utils.py", 'self.config.model_type == "whisper"'):
        "decoder_input_ids from Whisper's generate (prompts) are not prefixed with the decoder start token: "
        "WhisperMLAForConditionalGeneration._prepare_decoder_input_ids_for_generation "
        "(test_drop_in.py, the prompt_ids cases)",
    ("pipelines/automatic_speech_recognition.py", 'model.config.model_type == "whisper"'):
        "pipeline type 'seq2seq_whisper': WhisperMLAPipeline, named in config.custom_pipelines for a folder or Hub "
        "id, and model.pipeline_class for a model object; a model object without it refuses by name instead of "
        "being decoded as CTC (test_drop_in.py::test_pipeline_*)",
    ("models/whisper/modeling_whisper.py", "isinstance(module, WhisperEncoder)"):
        "_init_weights: Whisper-MLA's encoder is WhisperEncoder, so the same init",
    ("models/whisper/modeling_whisper.py", "isinstance(module, WhisperForAudioClassification)"):
        "_init_weights: not a Whisper-MLA class (audio classification), the same branch as for Whisper",
    ("pipelines/automatic_speech_recognition.py",
     "model.__class__.__name__ in MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES.values()"):
        "seq2seq by class name: False for WhisperMLAForConditionalGeneration (so 'ctc'), then WhisperMLAPipeline "
        "sets 'seq2seq_whisper'; without it the model refuses as above",
}
# Branches on the pipeline's `type`, which WhisperMLAPipeline sets to "seq2seq_whisper": all of them follow it.
PIPELINE_TYPE_BRANCH = "self.type"
# Branches of other models' code that mention Whisper (their own Whisper sub-configs), not reached by Whisper-MLA.
NOT_REACHED = {"models/dots3_note/configuration_dots3_note.py", "models/dots3_note/modular_dots3_note.py"}
# Files where a test of a class name (rather than of model_type) would also single Whisper out.
CLASS_NAME_FILES = ("pipelines/automatic_speech_recognition.py", "generation/")
# Class-name tests there that single out other models: a Whisper-MLA model takes the branch Whisper takes.
OTHER_MODELS = {
    ("generation/candidate_generator.py", '"Gemma4Assistant" not in assistant_model.__class__.__name__'),
    ("generation/candidate_generator.py", '"Gemma4UnifiedAssistant" not in assistant_model.__class__.__name__'),
    ("generation/stopping_criteria.py", 'decoder.__class__.__name__ == "ByteLevel"'),
    ("generation/utils.py", '"donut" in self.__class__.__name__.lower()'),
}


def _mentions_whisper(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and "whisper" in n.value.lower():
            return True
        if isinstance(n, ast.Name) and "whisper" in n.id.lower():
            return True
        if isinstance(n, ast.Attribute) and "whisper" in n.attr.lower():
            return True
    return False


def _tests_class_name(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == "__name__" for n in ast.walk(node))


def whisper_branches() -> list[tuple[str, int, str]]:
    """(file, line, source) of each comparison or isinstance/issubclass test in transformers that singles out Whisper,
    and each class-name test in the ASR pipeline and generation code."""
    root = Path(transformers.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8")
        if "whisper" not in source.lower() and not rel.startswith(CLASS_NAME_FILES):
            continue  # parse only what can hold such a branch
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            is_test = isinstance(node, ast.Compare) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("isinstance", "issubclass"))
            if not is_test:
                continue
            by_name = rel.startswith(CLASS_NAME_FILES) and _tests_class_name(node)
            if _mentions_whisper(node) or by_name:
                found.append((rel, node.lineno, " ".join(ast.get_source_segment(source, node).split())))
    return found


def test_every_whisper_branch_of_transformers_is_handled():
    branches = whisper_branches()
    unhandled = [f"transformers/{rel}:{line}: {code}" for rel, line, code in branches
                 if (rel, code) not in HANDLED.keys() | OTHER_MODELS and rel not in NOT_REACHED
                 and not code.startswith(PIPELINE_TYPE_BRANCH)]
    assert not unhandled, (
        f"Expected every branch of transformers {transformers.__version__} that singles out Whisper to be handled by "
        f"Whisper-MLA, but found {len(unhandled)} new:\n" + "\n".join(unhandled)
        + "\nFix: make Whisper-MLA take Whisper's path there (remote-code files), test it in tests/test_drop_in.py, "
        "and list it in HANDLED."
    )


def test_the_tripwire_sees_the_branches_it_lists():
    """The scan still finds each handled branch: a listed branch that moved or changed must be looked at again."""
    found = {(rel, code) for rel, _, code in whisper_branches()}
    stale = [key for key in {**HANDLED, **dict.fromkeys(OTHER_MODELS)} if key not in found]
    assert not stale, (f"Expected the branches listed in HANDLED in transformers {transformers.__version__}, but "
                       f"did not find {stale}; check what replaced them and update HANDLED.")
    assert any(code.startswith(PIPELINE_TYPE_BRANCH) for _, _, code in whisper_branches())
