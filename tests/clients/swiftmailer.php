<?php
// SwiftMailer (Laravel <= 8) with its sendmail transport. argv[1]: the command ("… -bs").
// Exit status 0 when send() counted both recipients; otherwise the exception text and exit 3.
require '/usr/share/php/Egulias/EmailValidator/autoload.php';
require '/usr/share/php/Swift/swift_required.php';

$mailer = new Swift_Mailer(new Swift_SendmailTransport($argv[1]));
$message = (new Swift_Message('Swift 测试'))
    ->setFrom(['app@example.com' => 'App'])
    ->setTo('to@example.com')
    ->setBcc('bcc@example.com')
    ->setBody("line1\n.\n..two dots\nünïcode\n");
try {
    $sent = $mailer->send($message);
} catch (Swift_TransportException $e) {
    echo $e->getMessage();
    exit(3);
}
exit($sent === 2 ? 0 : 3);
