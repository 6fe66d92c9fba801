"""The catalog a Barnum schema is judged by (issue 18): tables and columns,
constraints, indexes, functions (signature, result, security, settings and —
for the upgrade test — a digest of the body), triggers, policies, row level
security and the roles' grants.  Used by tests/test_upgrade.py (upgrade =
fresh install) and tests/test_catalog.py (fresh install = the committed
snapshot)."""

from __future__ import annotations

import psycopg

_QUERY = """
SELECT 'column', format('%s.%s %s %s %s', c.table_name, c.column_name, c.data_type, c.is_nullable,
                        coalesce(c.column_default, ''))
  FROM information_schema.columns c WHERE c.table_schema = 'barnum'
UNION ALL
SELECT 'constraint', format('%s %s %s', conrelid::regclass, conname, pg_get_constraintdef(oid))
  FROM pg_constraint WHERE connamespace = 'barnum'::regnamespace
UNION ALL
SELECT 'index', indexdef FROM pg_indexes WHERE schemaname = 'barnum'
UNION ALL
SELECT 'function', format('%s(%s) → %s%s%s%s', p.proname, pg_get_function_identity_arguments(p.oid),
                          pg_get_function_result(p.oid), CASE WHEN p.prosecdef THEN ' security definer' ELSE '' END,
                          coalesce(' ' || array_to_string(p.proconfig, ' '), ''),
                          CASE WHEN %(bodies)s THEN ' ' || md5(p.prosrc) ELSE '' END)
  FROM pg_proc p WHERE p.pronamespace = 'barnum'::regnamespace
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
UNION ALL
SELECT 'trigger', format('%s %s', tgrelid::regclass, pg_get_triggerdef(oid))
  FROM pg_trigger WHERE NOT tgisinternal AND tgrelid::regclass::text LIKE 'barnum.%%'
UNION ALL
SELECT 'policy', format('%s %s %s', tablename, policyname, qual) FROM pg_policies WHERE schemaname = 'barnum'
UNION ALL
SELECT 'grant', format('%s %s(%s)', r.rolname, p.proname, pg_get_function_identity_arguments(p.oid))
  FROM pg_proc p JOIN pg_roles r ON r.rolname IN ('barnum_relay', 'barnum_shim')
 WHERE p.pronamespace = 'barnum'::regnamespace AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
UNION ALL
SELECT 'rls', format('%s %s', relname, relrowsecurity) FROM pg_class
 WHERE relnamespace = 'barnum'::regnamespace AND relkind = 'r'
ORDER BY 1, 2
"""


def catalog(url: str, *, bodies: bool = True) -> list[tuple[str, str]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(_QUERY.replace("%(bodies)s", "true" if bodies else "false").encode()).fetchall()
    return [(str(k), str(v)) for k, v in rows]
