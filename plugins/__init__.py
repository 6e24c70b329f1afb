"""Built-in tokensaver plugins, installed as the package ``tokensaver_plugins``; registered through entry points."""
