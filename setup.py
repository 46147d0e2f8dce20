from setuptools import setup

# twisted/plugins is a namespace shared with Twisted: it must be listed
# explicitly and must never get an __init__.py.
setup(
    packages=["rtunnel", "rtunnel.fleet", "rtunnel.mux", "rtunnel.server", "rtunnel.tap", "twisted.plugins"],
    package_data={"twisted.plugins": ["rtunnel_plugin.py"], "rtunnel": ["assets/*"]},
)
