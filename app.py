"""`python app.py`: the hmt-qa web UI on http://127.0.0.1:7860 with the embedded default model.

Flags: --host --port --backbone --checkpoint --dtype --store --max-upload-mb (see --help).
Same as `hmtqa serve`.
"""

from app.server import main
from app.ui import build_demo

# Built at import (cheap: the model loads in the background once the server starts), so that
# `gradio app.py` and hosting platforms that look for `demo` find it.
demo = build_demo()

if __name__ == "__main__":
    raise SystemExit(main(demo=demo))
