"""The README and docs/ stay true: every command they show for our scripts parses with that
script's own argument parser, docs/flags.md is what `python -m tools.flags_table` prints now
(a new flag fails until it is regenerated), every relative link reaches a file (and a heading,
for links with #anchor), the README stays the front door (at most 200 lines), and its test command
is the one CI runs."""

import argparse
import glob
import importlib
import os
import re
import shlex

import pytest

from tests.conftest import ROOT
from tools.flags_table import COMMAND, flags_page

PAGES = ['README.md'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md'))
)
SHELL_ENDS = {
    '>',
    '>>',
    '|',
    '&&',
    ';',
    '2>&1',
}  # the command stops at a redirection or the next command


def read(page: str) -> str:
    with open(os.path.join(ROOT, page)) as f:
        return f.read()


def module_name(command: str) -> str:
    """The module a command runs: main_x.py -> main_x; -m tools.x -> tools.x."""
    if command.startswith('-m '):
        return command[3:]
    return command[: -len('.py')]


def page_commands(page: str):
    """(module, argv) for each `python main_x.py ...`, `torchrun ... main_x.py ...` and
    `python -m tools.x ...` / `-m benchmarks.x` line in a ```bash block."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', read(page), flags=re.S):
        joined = re.sub(r'\\\n\s*', ' ', block)
        for line in joined.splitlines():
            line = line.split('#')[0].strip()
            found = re.search(r'(?:^|\s)(main_\w+\.py|-m (?:tools|benchmarks)\.\w+)(\s.*)?$', line)
            if found and ('python' in line or 'torchrun' in line):
                argv = shlex.split(found.group(2) or '')
                ends = [i for i, a in enumerate(argv) if a in SHELL_ENDS]
                if ends:
                    argv = argv[: ends[0]]
                commands.append((module_name(found.group(1)), argv))
    return commands


def anchors(text: str) -> set:
    """GitHub's heading anchors:
    lower case, punctuation dropped, spaces to '-', repeats numbered."""
    seen = {}
    for heading in re.findall(r'^#+ (.*)$', re.sub(r'```.*?```', '', text, flags=re.S), flags=re.M):
        slug = re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f'{slug}-{seen[slug]}'] = 0
    return set(seen)


def links(page: str):
    """(target, anchor) of each relative Markdown link of a page, outside code and comments."""
    text = re.sub(r'```.*?```|`[^`\n]*`|<!--.*?-->', '', read(page), flags=re.S)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
        if not re.match(r'[a-z]+:', target):  # http:, https:, mailto:
            path, _, anchor = target.partition('#')
            yield path, anchor


@pytest.mark.parametrize('script,argv', [c for page in PAGES for c in page_commands(page)])
def test_command_parses(script, argv):
    module = importlib.import_module(script)
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()], exit_on_error=False)
    argv = [os.path.expandvars(a) for a in argv]
    parser.parse_args(argv)


def test_every_page_has_commands_checked():
    """The pages that show our scripts' commands keep showing them in ```bash blocks
    (the check above)."""
    for page in [
        'README.md',
        'docs/methods.md',
        'docs/evaluation.md',
        'docs/checkpoints.md',
        'docs/performance.md',
        'docs/pictures.md',
    ]:
        assert page_commands(page), f'{page} shows no command of our scripts in a ```bash block'


def test_flags_page_is_generated():
    assert read('docs/flags.md') == flags_page(), f'docs/flags.md is stale: run `{COMMAND}`'
    assert COMMAND in read('docs/flags.md')


@pytest.mark.parametrize('page', PAGES)
def test_links_resolve(page):
    for path, anchor in links(page):
        target = (
            os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path))
            if path
            else os.path.join(ROOT, page)
        )
        assert os.path.exists(target), f'{page} links to {path}, which does not exist'
        if anchor and target.endswith('.md'):
            with open(target) as f:
                assert anchor in anchors(f.read()), (
                    f'{page} links to {path}#{anchor}: no such heading'
                )


def test_readme_is_the_front_door():
    text = read('README.md')
    assert len(text.splitlines()) <= 200
    for page in PAGES[1:]:
        assert f']({page})' in text, f'the README does not link {page}'


def test_readme_test_command_is_what_ci_runs():
    """CI (.ci/run) runs the README's test command: the two stay the same."""
    tests = read('README.md').split('\n## Tests\n', 1)[1]
    command = re.search(r'```bash\n(.*?)\n```', tests, flags=re.S).group(1).strip()
    assert command == 'python3 -m pytest -q tests'
    assert command in read('.ci/run').splitlines()


def test_pictures_are_small_and_shown():
    """Every PNG under docs/ is at most 150 kB and shown by a page (the README shows the demo's)."""
    pictures = sorted(glob.glob(os.path.join(ROOT, 'docs', '*.png')))
    assert pictures
    text = ''.join(open(os.path.join(ROOT, page)).read() for page in PAGES)
    for path in pictures:
        assert os.path.getsize(path) <= 150_000, path
        assert f'docs/{os.path.basename(path)}' in text or f']({os.path.basename(path)})' in text, (
            path
        )
