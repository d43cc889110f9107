"""Modelfile grammar (a port of Ollama's parser), safe quoting, and the Go-template renderer."""

from __future__ import annotations

import pytest

from edgetune import gotemplate
from edgetune.errors import EdgetuneError
from edgetune.ollama.modelfile_syntax import format_modelfile, parse_modelfile, quote_value

# --------------------------------------------------------------------------- parser (Ollama grammar)
# Expected values follow Ollama's parser/parser.go semantics (cases in the style of its parser_test.go).
PARSE_CASES = [
    ('SYSTEM """This is a\nmultiline system."""', "This is a\nmultiline system."),
    ('SYSTEM """This is a multiline system with """ internal triple quotes."""',
     'This is a multiline system with """ internal triple quotes.'),
    ('SYSTEM """"""', ""),
    ('SYSTEM ""', ""),
    ("SYSTEM \"'\"", "'"),
    ('SYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""', '\'\'"\'""\'""\'"\'\'\'\'\'""\'""\''),
    ('TEMPLATE """\n{{ .Prompt }}\n"""', "\n{{ .Prompt }}\n"),
    ("SYSTEM   spaced   out   ", "spaced   out"),
    ('SYSTEM "  kept  "', "  kept  "),
    ('system """lower-case command"""', "lower-case command"),
]


@pytest.mark.parametrize("line,want", PARSE_CASES)
def test_parser_values(line, want):
    mf = parse_modelfile(f"FROM ./m.gguf\n{line}\n")
    name = line.split()[0].lower()
    assert mf.get(name) == want


def test_parser_commands_params_comments_messages():
    text = (
        "# a comment\n"
        "from ./model.gguf\n"
        "ADAPTER ./lora.gguf\n"
        'PARAMETER stop "<|im_end|>"\n'
        "PARAMETER stop <|im_start|>\n"
        "PARAMETER temperature 0.2\n"
        "MESSAGE user Hello there\n"
        "LICENSE apache-2.0\n"
    )
    mf = parse_modelfile(text)
    assert mf.get("model") == "./model.gguf"
    assert mf.get("adapter") == "./lora.gguf"
    assert mf.parameters == {"stop": ["<|im_end|>", "<|im_start|>"], "temperature": ["0.2"]}
    assert mf.get("message") == "user: Hello there"
    assert mf.get("license") == "apache-2.0"


@pytest.mark.parametrize(
    "text,needle",
    [
        ("FROM x\nBOGUS value\n", "Modelfile:2"),
        ('FROM x\nSYSTEM """never closed\n', "quoted value"),
        ("SYSTEM hello\n", "no FROM"),
        ("FROM x\nMESSAGE robot hi\n", "message role"),
    ],
)
def test_parser_errors_say_where(text, needle):
    with pytest.raises(EdgetuneError) as ei:
        parse_modelfile(text, where="Modelfile")
    assert needle in ei.value.render()


def test_parser_drops_unprintable_runes_like_ollama():
    # strconv.IsPrint drops a zero-width joiner: this is why the writer refuses such text.
    assert parse_modelfile('FROM x\nSYSTEM "a\u200db"\n').get("system") == "ab"


def test_early_close_is_real():
    # '"""' right before a newline closes the value in Ollama's grammar; the rest is a new command.
    with pytest.raises(EdgetuneError):
        parse_modelfile('FROM x\nSYSTEM """he said """\nhi"""\n')


# --------------------------------------------------------------------------- adversarial SYSTEM prompts
ADVERSARIAL = [
    'Use """triple quotes""" freely.',
    '"""',
    '""""""',
    'ends with a quote"',
    '"starts with a quote',
    "{{ .System }} and {{ range .Messages }}{{ end }} and }} {{",
    "back\\slash \\n not a newline \\\"",
    "line one\nline two\n\nline four",
    "  leading and trailing blanks  ",
    "\ttab\tseparated\t",
    "# not a comment\nFROM not-a-command\nPARAMETER stop x",
    "unicode: é ü ß 中文 日本語 עברית العربية 🌊🎉 e\u0301 ❤\ufe0f",
    "windows\r\nline endings\r\n",
    'quote then newline "\nnext',
    'x"""y\nz',  # '"""' not right before the line break is fine
    "",
]


@pytest.mark.parametrize("system", ADVERSARIAL)
def test_adversarial_system_round_trips(system):
    text = format_modelfile([("FROM", "./m.gguf"), ("SYSTEM", system), ("PARAMETER", "stop <|im_end|>")])
    mf = parse_modelfile(text)
    assert mf.get("system") == system
    assert mf.parameters["stop"] == ["<|im_end|>"]
    assert mf.get("model") == "./m.gguf"


@pytest.mark.parametrize(
    "system,needle",
    [
        ('he said """\nthen left', "line break"),
        ('"""\n"""x', "line break"),  # with the opening quotes this reads as '""""""' + newline
        ("family \U0001F468\u200d\U0001F469\u200d\U0001F467", "U+200D"),
        ("nul \x00 byte", "U+0000"),
        ("no-break\u00a0space", "U+00A0"),
    ],
)
def test_unwritable_system_is_refused_not_altered(system, needle):
    with pytest.raises(EdgetuneError) as ei:
        quote_value(system, "SYSTEM")
    assert needle in ei.value.render()


# --------------------------------------------------------------------------- Go template subset
def _msgs(*pairs):
    return [{"Role": r, "Content": c} for r, c in pairs]


def test_go_trim_markers_and_range():
    src = "A  {{- range $i, $m := .Messages }}\n[{{ $i }}:{{ $m.Role }}]  {{- end }}  \n {{- .System -}} \n!"
    out = gotemplate.render(src, {"Messages": _msgs(("user", "u"), ("assistant", "a")), "System": "S"})
    assert out == "A\n[0:user]\n[1:assistant]S!"


def test_go_last_idiom_and_functions():
    src = ('{{- range $i, $_ := .Messages }}{{- $last := eq (len (slice $.Messages $i)) 1 }}'
           '{{ .Role }}{{ if $last }}<last>{{ end }};{{ end }}'
           '{{ (index .Messages 0).Content }}|{{ len .Messages }}|{{ printf "%s-%d" "x" 3 }}'
           '|{{ if and .System (ne .System "z") }}yes{{ else if .System }}z{{ else }}no{{ end }}'
           '|{{ or "" "fallback" }}|{{ not .System }}|{{ "quoted \\"{{\\"" }}|{{ .Messages | len }}')
    out = gotemplate.render(src, {"Messages": _msgs(("user", "hi"), ("assistant", "yo")), "System": "s"})
    assert out == 'user;assistant<last>;hi|2|x-3|yes|fallback|false|quoted "{{"|2'


def test_go_data_is_not_reinterpreted():
    # Content containing template syntax is data, printed verbatim (as Go does).
    out = gotemplate.render("{{ range .Messages }}{{ .Content }}{{ end }}", {"Messages": _msgs(("user", "{{ .System }}"))})
    assert out == "{{ .System }}"


@pytest.mark.parametrize(
    "src",
    ["{{ if .System }}unclosed", "{{ end }}", "{{ template \"x\" }}", "{{ toTypeScriptType . }}", "{{ .System ", "{{ block \"b\" . }}x{{ end }}", "{{ range .System }}{{ end }}"],
)
def test_go_unsupported_or_broken_is_an_error(src):
    with pytest.raises(gotemplate.GoTemplateError):
        gotemplate.render(src, {"System": "s", "Messages": []})


def test_go_quote_round_trips():
    s = 'a "b" \\ {{ c }}\n\t\x01 é'
    assert gotemplate.render("{{ " + gotemplate.go_quote(s) + " }}", {}) == s
