"""`lmforge board`: a local web interface built on the commands.

The board composes the very command lines a user would type (from the option declarations in
core/catalog.py), shows them, and runs them as subprocesses; it has no private code path.

    workspace.py  every path the browser names, resolved and kept inside the workspace
    pipeline.py   form values -> argument lists -> a shell pipeline or a Makefile
    runs.py       run directories: state on disk (board.json), start, stop, resume, monitor
    runner.py     the detached process that runs one run's steps (survives the board)
    preview.py    dataset preview: aligned rows, trained tokens (loss mask), `data stats`
    server.py     the FastAPI app: JSON API, the static page, chat streamed through infer/
    static/       one page: HTML, vanilla JS and CSS (no build step, nothing fetched at run time)
    locales/      every UI string, in en, zh and ru
"""
