-- 0002: workflows carry their own expiry time.
--
-- tick() expires 'sent' pre_confirmation/reminder workflows once their
-- appointment has started.  Finding them by joining appointments scans every
-- sent workflow on each sweep (38–322 ms with 1 M past appointments, see
-- bench/RESULTS.md); with the time on the workflow row a partial index finds
-- exactly the due ones (0.03 ms).  open_workflow() fills it in from the
-- appointment's starts_at; a reschedule closes those workflows, so the value
-- never has to follow a moved appointment.
ALTER TABLE barnum.whatsapp_workflows ADD COLUMN expires_at timestamptz;

-- Open workflows of the first release get theirs from the appointment.
UPDATE barnum.whatsapp_workflows w
   SET expires_at = a.starts_at
  FROM barnum.appointments a
 WHERE a.id = w.appointment_id
   AND w.workflow_type IN ('pre_confirmation', 'reminder')
   AND w.status IN ('pending', 'sent');

CREATE INDEX whatsapp_workflows_sent_expiry_idx
    ON barnum.whatsapp_workflows (expires_at)
    WHERE status = 'sent' AND expires_at IS NOT NULL;
