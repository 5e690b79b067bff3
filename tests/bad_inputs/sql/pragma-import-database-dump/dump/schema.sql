CREATE TABLE imported AS SELECT 1 AS x;
COPY (SELECT 'written through factory sql' AS x) TO '{tmp}/pwned.csv';
