<?php
// PHP mail() / mb_send_mail() called as a web application calls them. argv[1]: the arguments as
// JSON {"to", "subject", "body", "headers", "params" (the 5th argument), "mb" (use mb_send_mail)}.
// Exit status: 0 when the function returned true, 1 when false.
$a = json_decode($argv[1], true, 16, JSON_THROW_ON_ERROR);
$args = [$a['to'], $a['subject'], $a['body'], $a['headers'] ?? ''];
if (isset($a['params'])) {
    $args[] = $a['params'];
}
if (!empty($a['mb'])) {
    mb_language('uni');
    mb_internal_encoding('UTF-8');
    $ok = mb_send_mail(...$args);
} else {
    $ok = mail(...$args);
}
exit($ok ? 0 : 1);
