pytest_plugins = ["tokensaver.testing"]
