-- Encryption at rest (docs/OPERATIONS.md, "Encryption at rest"). A message's
-- content is stored one of two ways:
--   plain:  content (jsonb), key_id and ciphertext null: no key configured,
--           stored before one was, or a deleted message's tombstone ('null');
--   sealed: ciphertext (AES-256-GCM, see src/crypto.rs) under the key named
--           by key_id, content null.
-- Edits rewrite all three; `postline keys rotate` moves rows to the active
-- key in small batches, using `key_id` itself as its progress.

ALTER TABLE messages
    ALTER COLUMN content DROP NOT NULL,
    ADD COLUMN key_id     text CHECK (length(key_id) BETWEEN 1 AND 32),
    ADD COLUMN ciphertext bytea;

-- NOT VALID: every existing row already satisfies it (content was NOT NULL
-- and the new columns are null), so the full-table check, made under this
-- migration's exclusive lock, is skipped. New and updated rows are checked.
ALTER TABLE messages
    ADD CONSTRAINT messages_content_plain_or_sealed CHECK (
        CASE WHEN key_id IS NULL THEN content IS NOT NULL AND ciphertext IS NULL
             ELSE content IS NULL AND ciphertext IS NOT NULL END
    ) NOT VALID;
