"""TaD-Eval dashboard: `tad dashboard` (or `streamlit run dashboard/app.py`).

One Streamlit app with `st.navigation`; each page is a two-line script in `dashboard/app_pages/` that calls the
`render()` of its module in `dashboard/views/` (the folder is not named `pages/`: Streamlit would also serve that
one as a legacy multipage app, bypassing this entry point). Before any page runs, the app checks the results
database (TAD_DATABASE_URL) and shows what to do when there is none, it has no schema or it cannot be reached.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import data  # noqa: E402

PAGES = [
    ("app_pages/leaderboard.py", "Leaderboard", ":material/leaderboard:"),
    ("app_pages/compare.py", "Run comparison", ":material/compare_arrows:"),
    ("app_pages/sweep.py", "Alpha sweep", ":material/show_chart:"),
    ("app_pages/study.py", "Study", ":material/science:"),
    ("app_pages/knowledge.py", "Knowledge vectors", ":material/scatter_plot:"),
    ("app_pages/regression.py", "Regressions", ":material/trending_down:"),
    ("app_pages/jobs.py", "Live jobs", ":material/sync:"),
    ("app_pages/submit.py", "Submit", ":material/upload:"),
]


def main() -> None:
    st.set_page_config(page_title="TaD-Eval", page_icon=":material/insights:", layout="wide")
    nav = st.navigation([st.Page(path, title=title, icon=icon, default=i == 0)
                         for i, (path, title, icon) in enumerate(PAGES)])
    url = data.database_url()
    with st.sidebar:
        st.caption(f"Database: `{data.display_url(url)}`")
        if st.button("Refresh data", icon=":material/refresh:"):
            data.clear_caches()
    status = data.db_status(url)
    if not status.ok:
        st.title(nav.title)
        if status.state == "down":
            st.error(status.message, icon=":material/cloud_off:")
        else:
            st.info(status.message, icon=":material/database:")
        st.stop()
    nav.run()


main()
