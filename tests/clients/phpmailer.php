<?php
// PHPMailer as applications use it. argv[1]: "sendmail" (isSendmail) or "mail" (isMail).
// Exit status 0 when send() succeeded; otherwise the exception text on stderr and exit 1.
require '/usr/share/php/libphp-phpmailer/autoload.php';

use PHPMailer\PHPMailer\PHPMailer;

$m = new PHPMailer(true);
if ($argv[1] === 'mail') {
    $m->isMail();
} else {
    $m->isSendmail();
}
$m->CharSet = PHPMailer::CHARSET_UTF8;
$m->setFrom('webmaster@example.com', 'Web Master');  // also sets Sender, hence -fwebmaster@example.com
$m->addAddress('to@example.com', 'To Name');
$m->addCC('cc@example.com');
$m->addBCC('bcc@example.com');
$m->Subject = 'PHPMailer 测试';
$m->Body = "line1\n.\n..two dots\nünïcode\n";
try {
    $m->send();
} catch (PHPMailer\PHPMailer\Exception $e) {
    fwrite(STDERR, $e->getMessage() . "\n");
    exit(1);
}
