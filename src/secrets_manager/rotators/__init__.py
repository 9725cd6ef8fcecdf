"""Built-in rotation targets: where a rotation sets and tests a new value without a command of
the user's (DESIGN.md section 8: "Rotators: random value, PostgreSQL role password, external
command"). The external command lives in rotation.py; this package holds the ones we ship."""
