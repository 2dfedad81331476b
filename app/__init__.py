"""The clinician page (``streamlit run app/streamlit_app.py``): its modules, imported as ``app.NAME``.

``pip install -e .`` makes this package importable wherever Streamlit starts the page from.
"""
