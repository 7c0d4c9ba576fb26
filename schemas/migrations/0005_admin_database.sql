-- The admin tables (orgs, API keys, budgets) move to their own database, `{admin}` (the events
-- database's name + `_admin`), which the read-only analyst user cannot see: ClickHouse 18.16 has
-- no per-table grants, only a user's list of databases. RENAME moves the tables' parts as they
-- are: nothing is copied, nothing is lost. `model_prices` stays beside the events: analysts
-- price with it. (On a current ClickHouse, docs/analysts.md gives the equivalent GRANTs.)
CREATE DATABASE IF NOT EXISTS {admin};
RENAME TABLE {db}.orgs TO {admin}.orgs;
RENAME TABLE {db}.api_keys TO {admin}.api_keys;
RENAME TABLE {db}.budgets TO {admin}.budgets;
